//! Whether this node's link to Redis works, judged by what it does rather than by what
//! the driver believes: every second the node publishes a heartbeat on the presence
//! channel, to which it is subscribed itself, and the link is up while its own
//! heartbeats come back. A killed Redis resets the connections and the driver says so
//! at once; a hung one (a stopped process, a frozen VM, a partition that drops packets)
//! keeps them open and answers nothing, and only this deadline notices it.
//!
//! Plain data, driven by the backplane thread's clock (unit-tested below).

use std::time::{Duration, Instant};

/// How long the node's heartbeats may stay unanswered before Redis counts as gone.
pub const UNRESPONSIVE: Duration = Duration::from_secs(3);
/// The same once the driver reported a failed or lost connection since the last echo
/// (the error alone is not enough: the driver also reports a failure of a connection
/// it already replaced, after the link works again).
pub const UNRESPONSIVE_AFTER_ERROR: Duration = Duration::from_millis(1500);
/// How long a starting node waits for Redis before it says it cannot reach it.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);
/// While Redis stays unreachable, one log line per this interval at most.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not yet heard back from Redis since the node started.
    Starting,
    Up,
    Down,
}

/// A change of [`LinkState`] the backplane acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Redis answers: `after` is how long it was unreachable (`None` if it answered at
    /// once), `again` whether it had answered before (a reconnection).
    Up {
        after: Option<Duration>,
        again: bool,
    },
    /// Redis stopped answering (or never did): the line to log.
    Down { report: String },
}

pub struct Health {
    /// The Redis address as logged (without credentials).
    address: String,
    state: LinkState,
    /// When the current state began.
    since: Instant,
    last_echo: Option<Instant>,
    /// Whether Redis ever answered since the node started.
    was_up: bool,
    /// What the driver last reported, and how many failures since the last log line.
    last_error: Option<String>,
    /// The driver reported a failure since the last echo.
    failed_since_echo: bool,
    failures: u64,
    logged_at: Instant,
}

impl Health {
    pub fn new(address: String, now: Instant) -> Health {
        Health {
            address,
            state: LinkState::Starting,
            since: now,
            last_echo: None,
            was_up: false,
            last_error: None,
            failed_since_echo: false,
            failures: 0,
            logged_at: now,
        }
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The node heard its own heartbeat: Redis took it and delivered it.
    pub fn echo(&mut self, now: Instant) -> Option<Change> {
        self.last_echo = Some(now);
        self.failed_since_echo = false;
        if self.state == LinkState::Up {
            return None;
        }
        let after = (self.state == LinkState::Down).then(|| now - self.since);
        let again = std::mem::replace(&mut self.was_up, true);
        self.state = LinkState::Up;
        self.since = now;
        self.failures = 0;
        self.last_error = None;
        Some(Change::Up { after, again })
    }

    /// The driver reported a failed connection (or a reset one): the link is judged
    /// down sooner if the heartbeats do not come back ([`UNRESPONSIVE_AFTER_ERROR`]).
    pub fn failed(&mut self, error: String) {
        self.failures += 1;
        self.last_error = Some(error);
        self.failed_since_echo = true;
    }

    /// Looks at the clock: a starting node that has not reached Redis, or a link whose
    /// heartbeats stopped coming back, goes down.
    pub fn check(&mut self, now: Instant) -> Option<Change> {
        let allowed = if self.failed_since_echo {
            UNRESPONSIVE_AFTER_ERROR
        } else {
            UNRESPONSIVE
        };
        let overdue = match self.state {
            LinkState::Starting => now - self.since > STARTUP_GRACE,
            LinkState::Up => self.last_echo.is_none_or(|echo| now - echo > allowed),
            LinkState::Down => false,
        };
        overdue.then(|| self.go_down(now))
    }

    fn go_down(&mut self, now: Instant) -> Change {
        self.state = LinkState::Down;
        self.since = now;
        self.logged_at = now;
        let error = self
            .last_error
            .clone()
            .unwrap_or_else(|| format!("no answer within {} s", UNRESPONSIVE.as_secs()));
        self.failures = 0;
        Change::Down {
            report: format!(
                "cannot reach Redis at {}: {error}; local delivery goes on, cross-node sends \
                 are dropped until it is back",
                self.address
            ),
        }
    }

    /// While down, a line to log once per [`LOG_EVERY`], with what happened since.
    pub fn report(&mut self, now: Instant) -> Option<String> {
        if self.state != LinkState::Down || now - self.logged_at < LOG_EVERY {
            return None;
        }
        self.logged_at = now;
        let failures = std::mem::take(&mut self.failures);
        let error = self.last_error.as_deref().unwrap_or("no answer");
        Some(format!(
            "Redis at {} still unreachable after {} s ({failures} failed attempts in the last {} s; last: {error})",
            self.address,
            (now - self.since).as_secs(),
            LOG_EVERY.as_secs()
        ))
    }
}

/// A Redis URL as it may be logged: the password, if any, left out.
pub fn loggable_address(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = match rest.split_once('@') {
        Some((_credentials, host)) => host,
        None => rest,
    };
    format!("{scheme}://{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn a_node_is_up_once_its_heartbeat_comes_back() {
        let start = Instant::now();
        let mut health = Health::new("redis://r:6379".into(), start);
        assert_eq!(health.check(at(start, 500)), None);
        assert_eq!(
            health.echo(at(start, 600)),
            Some(Change::Up {
                after: None,
                again: false
            })
        );
        assert_eq!(health.echo(at(start, 1600)), None, "already up");
        assert_eq!(health.state(), LinkState::Up);
    }

    #[test]
    fn a_redis_that_never_answers_is_reported_within_the_startup_grace() {
        let start = Instant::now();
        let mut health = Health::new("redis://r:6379".into(), start);
        health.failed("Connection refused (os error 111)".into());
        assert_eq!(health.check(at(start, 900)), None);
        let Some(Change::Down { report }) = health.check(at(start, 1100)) else {
            panic!("down after the grace");
        };
        assert!(
            report.contains("redis://r:6379") && report.contains("refused"),
            "{report}"
        );
        assert_eq!(health.state(), LinkState::Down);
    }

    #[test]
    fn a_hung_redis_is_noticed_by_its_missing_echoes() {
        let start = Instant::now();
        let mut health = Health::new("redis://r:6379".into(), start);
        health.echo(at(start, 100));
        health.echo(at(start, 1100));
        assert_eq!(
            health.check(at(start, 4000)),
            None,
            "3 s without an echo is allowed"
        );
        let Some(Change::Down { report }) = health.check(at(start, 4200)) else {
            panic!("down once the echoes stopped for longer");
        };
        assert!(report.contains("no answer within 3 s"), "{report}");
        assert_eq!(
            health.echo(at(start, 9200)),
            Some(Change::Up {
                after: Some(Duration::from_secs(5)),
                again: true
            })
        );
    }

    #[test]
    fn a_reset_connection_is_down_sooner_and_logged_once_per_interval() {
        let start = Instant::now();
        let mut health = Health::new("redis://r:6379".into(), start);
        health.echo(at(start, 100));
        health.failed("Connection reset by peer".into());
        assert_eq!(health.check(at(start, 1500)), None);
        assert!(matches!(
            health.check(at(start, 1700)),
            Some(Change::Down { .. })
        ));
        health.failed("refused".into());
        assert_eq!(health.report(at(start, 5000)), None);
        health.failed("refused".into());
        let line = health.report(at(start, 11_800)).expect("a line after 10 s");
        assert!(
            line.contains("2 failed attempts") && line.contains("after 10 s"),
            "{line}"
        );
        assert_eq!(health.report(at(start, 13_000)), None);
    }

    #[test]
    fn a_late_report_of_a_replaced_connection_does_not_take_a_working_link_down() {
        let start = Instant::now();
        let mut health = Health::new("redis://r:6379".into(), start);
        health.echo(at(start, 100));
        health.failed("Connection reset by peer".into());
        health.echo(at(start, 1000));
        assert_eq!(health.check(at(start, 1900)), None);
        assert_eq!(health.state(), LinkState::Up);
    }

    #[test]
    fn credentials_are_not_logged() {
        assert_eq!(
            loggable_address("redis://user:secret@10.0.0.5:6379/0"),
            "redis://10.0.0.5:6379/0"
        );
        assert_eq!(loggable_address("redis://h:1"), "redis://h:1");
        assert_eq!(
            loggable_address("redis+unix:///run/r.sock"),
            "redis+unix:///run/r.sock"
        );
    }
}
