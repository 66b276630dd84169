//! Flow control between publishers and receivers (contract section 6): a publisher
//! may have only so many bytes of messages on their way, and a message stays "on its
//! way" until every recipient queue took it within its bound. A message that a
//! congested receiver cannot take yet keeps its [`Ticket`], so its publisher's
//! [`Window`] stays charged and the publisher waits (its socket is not read, a REST
//! send does not answer) instead of a queue growing or a healthy receiver being closed.
//!
//! Windows are shared between threads: a publisher on one shard is charged, shards
//! that deliver its message release the charge when they drop their references to its
//! ticket. One atomic add per send and one subtraction per release; waiters are woken
//! only when a window was full.

use std::future::Future;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::oneshot;

/// The least a message is charged: bounds how many messages (and the per-recipient
/// entries they may need while a receiver is congested) one window lets through.
pub const MIN_CHARGE: usize = 1024;

/// What a message waiting in a congested receiver's queue costs beside its bytes (the
/// queue entry and the reference to its ticket), charged to its publisher's window.
pub const HELD_ENTRY_CHARGE: usize = 48;

/// A budget of bytes on their way: a send may start while less than `limit` is in use
/// here (and in the parent window, when there is one); what it is charged is given
/// back when its ticket is dropped.
pub struct Window {
    limit: usize,
    used: AtomicUsize,
    /// A wider budget this one draws on too (a shard's, for its connections' windows).
    parent: Option<Arc<Window>>,
    waiters: Mutex<Vec<Waker>>,
    waiting: AtomicBool,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("limit", &self.limit)
            .field("used", &self.used.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl Window {
    pub fn new(limit: usize, parent: Option<Arc<Window>>) -> Arc<Window> {
        Arc::new(Window {
            limit,
            used: AtomicUsize::new(0),
            parent,
            waiters: Mutex::new(Vec::new()),
            waiting: AtomicBool::new(false),
        })
    }

    /// Bytes charged and not yet given back.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(SeqCst)
    }

    /// Whether a send may start now (here and in every parent window).
    pub fn has_room(&self) -> bool {
        self.used.load(SeqCst) < self.limit && self.parent.as_ref().is_none_or(|p| p.has_room())
    }

    /// Resolves once a send may start.
    pub fn room(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let window = self.clone();
        std::future::poll_fn(move |cx| {
            if window.has_room() {
                return Poll::Ready(());
            }
            // Registered before looking again: a release in between finds the waker.
            window.wait_on_full(cx.waker());
            if window.has_room() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Charges `bytes` (at least [`MIN_CHARGE`]) for a send; dropping the ticket (its
    /// last reference) gives them back.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Ticket {
        let bytes = bytes.max(MIN_CHARGE);
        self.add(bytes);
        Ticket {
            window: self.clone(),
            bytes: AtomicUsize::new(bytes),
            holders: AtomicUsize::new(0),
            kept_up: AtomicBool::new(false),
            last_taken: AtomicU64::new(0),
            done: None,
        }
    }

    /// [`Window::charge`], and a receiver that resolves once the ticket is released:
    /// the message is then queued within bounds everywhere.
    pub fn charge_and_notify(self: &Arc<Self>, bytes: usize) -> (Ticket, oneshot::Receiver<()>) {
        let (done, released) = oneshot::channel();
        let mut ticket = self.charge(bytes);
        ticket.done = Some(done);
        (ticket, released)
    }

    fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, SeqCst);
        if let Some(parent) = &self.parent {
            parent.add(bytes);
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, SeqCst);
        if self.waiting.load(SeqCst) {
            let waiters = std::mem::take(&mut *self.lock_waiters());
            self.waiting.store(false, SeqCst);
            waiters.into_iter().for_each(Waker::wake);
        }
        if let Some(parent) = &self.parent {
            parent.release(bytes);
        }
    }

    /// Registers `waker` with every full window in the chain.
    fn wait_on_full(&self, waker: &Waker) {
        if self.used.load(SeqCst) >= self.limit {
            let mut waiters = self.lock_waiters();
            if !waiters.iter().any(|w| w.will_wake(waker)) {
                waiters.push(waker.clone());
            }
            self.waiting.store(true, SeqCst);
        }
        if let Some(parent) = &self.parent {
            parent.wait_on_full(waker);
        }
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, Vec<Waker>> {
        // A waker list is valid whatever panicked while it was held.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One send's charge on its publisher's window, shared (`Arc<Ticket>`) by every shard
/// that delivers the message and by every congested queue that holds it. Released when
/// the last reference is dropped.
pub struct Ticket {
    window: Arc<Window>,
    bytes: AtomicUsize,
    /// The congested receivers holding the message now, and whether a recipient kept up
    /// with it (queued it with little before it, or took it from its held queue). These
    /// tell whether a receiver holds the publisher alone after the others took the
    /// message (see `Outbox::behind_the_others`). A recipient that queues it behind a
    /// long backlog of its own is not keeping up (a reader that stopped, while its
    /// queue fills): that makes nobody else look slow.
    holders: AtomicUsize,
    kept_up: AtomicBool,
    /// When a receiver that held the message last took it (nanoseconds after
    /// [`epoch`]; 0: none did): from then on, whoever still holds it is behind the
    /// others.
    last_taken: AtomicU64,
    done: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("bytes", &self.bytes.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// Charges the publisher for memory its message takes while waiting somewhere
    /// (an entry in a congested receiver's queue).
    pub fn charge_more(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, SeqCst);
        self.window.add(bytes);
    }

    /// A recipient queued the message with little before it: it keeps up. (A load
    /// first: one store per message, not one write of a shared line per recipient.)
    pub fn kept_up(&self) {
        if !self.kept_up.load(Relaxed) {
            self.kept_up.store(true, Relaxed);
        }
    }

    /// A congested receiver holds the message.
    pub fn held(&self) {
        self.holders.fetch_add(1, Relaxed);
    }

    /// A receiver that held the message took it (`taken`) or dropped it (it was closed).
    pub fn let_go(&self, taken: bool) {
        if taken {
            let since_epoch = Instant::now().duration_since(epoch()).as_nanos() as u64;
            self.last_taken.fetch_max(since_epoch.max(1), Relaxed);
            self.kept_up();
        }
        self.holders.fetch_sub(1, Relaxed);
    }

    /// When a receiver that held the message last took it, if one did.
    pub fn last_taken(&self) -> Option<Instant> {
        match self.last_taken.load(Relaxed) {
            0 => None,
            nanos => Some(epoch() + Duration::from_nanos(nanos)),
        }
    }

    /// Whether exactly one receiver holds the message while another recipient (on this
    /// node) kept up with it: that one alone keeps the publisher waiting.
    pub fn held_by_one_after_another_took_it(&self) -> bool {
        self.holders.load(Relaxed) == 1 && self.kept_up.load(Relaxed)
    }
}

/// The instant [`Ticket::last_taken`] counts from (one per process, so that tickets
/// shared between shards agree).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.window.release(*self.bytes.get_mut());
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Wake};

    use super::*;

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, SeqCst);
        }
    }

    fn poll_room(window: &Arc<Window>, flag: &Arc<Flag>) -> bool {
        let waker = Waker::from(flag.clone());
        let mut room = std::pin::pin!(window.room());
        room.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
    }

    #[test]
    fn a_full_window_waits_until_a_ticket_is_dropped() {
        let window = Window::new(4000, None);
        let flag = Arc::new(Flag::default());
        let first = Arc::new(window.charge(3000));
        assert!(poll_room(&window, &flag), "room below the limit");
        let second = window.charge(10);
        assert_eq!(
            window.used(),
            3000 + MIN_CHARGE,
            "small sends pay the minimum"
        );
        assert!(!poll_room(&window, &flag), "full");
        let shard_copy = first.clone();
        drop(first);
        assert!(!flag.0.load(SeqCst), "a copy still holds it");
        drop(shard_copy);
        assert!(flag.0.load(SeqCst), "the waiter was woken");
        assert!(poll_room(&window, &Arc::new(Flag::default())));
        drop(second);
        assert_eq!(window.used(), 0);
    }

    #[test]
    fn a_parent_window_bounds_all_its_children_and_extra_charges_are_released() {
        let shard = Window::new(2 * MIN_CHARGE, None);
        let a = Window::new(1 << 20, Some(shard.clone()));
        let b = Window::new(1 << 20, Some(shard.clone()));
        let ticket = a.charge(2 * MIN_CHARGE);
        let flag = Arc::new(Flag::default());
        assert!(!poll_room(&b, &flag), "the shard's budget is spent");
        ticket.charge_more(HELD_ENTRY_CHARGE);
        assert_eq!(a.used(), 2 * MIN_CHARGE + HELD_ENTRY_CHARGE);
        assert_eq!(shard.used(), a.used());
        drop(ticket);
        assert!(flag.0.load(SeqCst));
        assert_eq!((a.used(), shard.used()), (0, 0));
    }

    #[test]
    fn a_notified_ticket_tells_when_it_is_released() {
        let window = Window::new(1 << 20, None);
        let (ticket, mut released) = window.charge_and_notify(5);
        assert_eq!(released.try_recv(), Ok(None));
        drop(ticket);
        assert_eq!(released.try_recv(), Ok(Some(())));
    }
}
