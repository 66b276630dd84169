//! Admission limits a node's shards share: a count (sessions, pending negotiations) or
//! a number of bytes (input kept for sessions not started yet), taken without waiting
//! and refused past the limit, given back when the [`Share`] is dropped. Unlike a
//! publisher's `flow::Window`, nothing waits on a quota: what does not fit is refused
//! with a clear answer (contract section 6).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Quota {
    used: AtomicUsize,
    limit: usize,
}

/// Part of a [`Quota`], given back when dropped.
#[derive(Debug)]
pub struct Share {
    quota: Arc<Quota>,
    amount: usize,
}

impl Quota {
    pub fn new(limit: usize) -> Arc<Quota> {
        Arc::new(Quota {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `amount`, unless that would pass the limit.
    pub fn try_take(self: &Arc<Self>, amount: usize) -> Option<Share> {
        self.reserve(amount).then(|| Share {
            quota: self.clone(),
            amount,
        })
    }

    fn reserve(&self, amount: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(amount)
                    .filter(|&after| after <= self.limit)
            })
            .is_ok()
    }
}

impl Share {
    /// Takes `more` into this share, unless that would pass the quota's limit.
    pub fn try_grow(&mut self, more: usize) -> bool {
        let grown = self.quota.reserve(more);
        if grown {
            self.amount += more;
        }
        grown
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.quota.used.fetch_sub(self.amount, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_past_the_limit_and_given_back_when_dropped() {
        let quota = Quota::new(10);
        let mut first = quota.try_take(4).unwrap();
        let second = quota.try_take(6).unwrap();
        assert!(quota.try_take(1).is_none(), "full");
        assert!(!first.try_grow(1));
        drop(second);
        assert!(first.try_grow(5));
        assert_eq!(quota.used(), 9);
        drop(first);
        assert_eq!(quota.used(), 0);
        assert!(quota.try_take(usize::MAX).is_none(), "no overflow");
    }
}
