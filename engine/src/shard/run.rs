//! The body of a shard thread: its io_uring runtime, its listener's accept loop, its
//! inbox, its timers (keep-alive, client timeouts, presence notices), and the end.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytes::BytesMut;
use monoio::net::{TcpListener, TcpStream};
use ringhub_protocol::frame::{self, Framing};
use ringhub_protocol::{HubMessage, HubProtocol};

use crate::api::hub::HubFactories;
use crate::fanout::FrameKind;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::presence::PRESENCE_INTERVAL;
use crate::session::{EndReason, CLOSE_GRACE};
use crate::shard::state::ShardState;
use crate::transport::websocket::HANDSHAKE_TIMEOUT;
use crate::transport::{channel, http};

/// The body of a shard thread.
pub fn run(
    index: usize,
    core: usize,
    listener: std::net::TcpListener,
    node: Arc<Node>,
    hubs: HubFactories,
) {
    if let Err(e) = monoio::utils::bind_to_cpu_set([core]) {
        tracing::warn!(shard = index, core, "could not pin the shard thread: {e:?}");
    }
    let mut runtime = match crate::runtime::shard_runtime(node.io_driver, 1024) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(shard = index, driver = ?node.io_driver, "cannot start the shard's runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(shard = index, "cannot use the listener: {e}");
                return;
            }
        };
        let state = Rc::new(ShardState::new(index, node, hubs.make()));
        let weak = Rc::downgrade(&state);
        state.set_adopter(Box::new(move |socket, buffered| {
            let Some(state) = weak.upgrade() else {
                return;
            };
            match TcpStream::from_std(socket) {
                Ok(stream) => {
                    monoio::spawn(http::serve_http(state, stream, buffered));
                }
                Err(e) => tracing::warn!(shard = state.index, "cannot adopt a connection: {e}"),
            }
        }));
        let inbox_state = state.clone();
        monoio::spawn(async move {
            let node = inbox_state.node.clone();
            node.inboxes[inbox_state.index]
                .run(|c| inbox_state.handle(c))
                .await;
        });
        monoio::spawn(state.flusher.clone().run());
        monoio::spawn(tick(state.clone()));
        monoio::spawn(presence_notifier(state.clone()));
        monoio::spawn(slow_consumer_watch(state.clone()));
        state
            .node
            .ready_shards
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::debug!(shard = index, "accepting");
        let mut backoff = AcceptBackoff::default();
        loop {
            let accepted = monoio::select! {
                a = listener.accept() => a,
                _ = state.shutdown.fired() => break,
            };
            match accepted {
                Ok((stream, _)) => {
                    backoff.succeeded(index);
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(http::serve_http(state.clone(), stream, BytesMut::new()));
                }
                Err(e) => {
                    let pause = backoff.failed(index, &e, Instant::now());
                    monoio::time::sleep(pause).await;
                }
            }
        }
        drop(listener);
        // Tell every client, spread out, give them a moment to read it, then end; all
        // within --drain-secs.
        let stop_began = Instant::now();
        let drain = state.node.config.drain;
        close_spread_out(&state, drain / 2).await;
        let deadline = (Instant::now() + CLOSE_GRACE).min(stop_began + drain);
        while state.has_sessions() && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        // Stop every session still open (long polls, streams) and let the ring finish
        // what dropping their sockets and the listener started (cancellations, closes):
        // a ring torn down with operations in flight keeps their sockets, the listener
        // included, alive after the process exits, and a restart on the same address
        // would find it still accepting.
        for session in state.all_sessions() {
            session.stop_now();
        }
        for channel in state.tokens.channels() {
            crate::transport::channel::dispose(&state, &channel);
        }
        monoio::time::sleep(Duration::from_millis(50)).await;
    });
}

/// How many clients one shard tells to reconnect per second when the node stops: a
/// node's ten thousand clients come back over seconds, not in the same 50 ms (their
/// reconnects are negotiates, handshakes and durable-group reads for the other nodes).
const CLOSES_PER_SECOND: usize = 500;
/// The longest a shard spreads its closes over.
const CLOSE_SPREAD_MAX: Duration = Duration::from_secs(5);
/// How often a spread-out stop closes its next batch.
const CLOSE_STEP: Duration = Duration::from_millis(50);

/// Closes every session of the shard (Close, reconnect allowed) in batches every
/// [`CLOSE_STEP`], at most [`CLOSES_PER_SECOND`], over at most `within` (and
/// [`CLOSE_SPREAD_MAX`]).
async fn close_spread_out(state: &ShardState, within: Duration) {
    let sessions = state.all_sessions();
    let needed = Duration::from_secs_f64(sessions.len() as f64 / CLOSES_PER_SECOND as f64);
    let spread = needed.min(within).min(CLOSE_SPREAD_MAX);
    let steps = (spread.as_millis() / CLOSE_STEP.as_millis()).max(1) as usize;
    let per_step = sessions.len().div_ceil(steps).max(1);
    for (i, batch) in sessions.chunks(per_step).enumerate() {
        if i > 0 {
            monoio::time::sleep(CLOSE_STEP).await;
        }
        for session in batch {
            session.ending(EndReason::ServerStopping);
            session.close(None, true);
        }
    }
}

/// Failed accepts (out of file descriptors, mostly): the loop pauses longer each time,
/// up to [`AcceptBackoff::MAX_PAUSE`], and logs once per [`AcceptBackoff::LOG_EVERY`]
/// with a count, instead of spinning and logging every failure. Connections already
/// open keep being served meanwhile, and accepting resumes once descriptors free up.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
    /// Failures not yet logged, and when the last log line was written.
    unlogged: u64,
    logged_at: Option<Instant>,
    total: u64,
}

impl AcceptBackoff {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_millis(500);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Counts a failure; the pause before the next accept.
    fn failed(&mut self, shard: usize, error: &std::io::Error, now: Instant) -> Duration {
        self.unlogged += 1;
        self.total += 1;
        if self.logged_at.is_none_or(|at| now - at >= Self::LOG_EVERY) {
            tracing::warn!(
                shard,
                failures = self.unlogged,
                "accept failed: {error} (pausing accepts; logged at most every {} s)",
                Self::LOG_EVERY.as_secs()
            );
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
        self.pause = (self.pause * 2).clamp(Self::FIRST_PAUSE, Self::MAX_PAUSE);
        self.pause
    }

    fn succeeded(&mut self, shard: usize) {
        if self.total > 0 {
            tracing::info!(shard, failures = self.total, "accepting again");
            *self = AcceptBackoff::default();
        }
    }
}

/// How often a shard checks its sessions' timers.
const TICK: Duration = Duration::from_secs(1);

/// This many client-timeout closes in one tick are logged.
const MANY_TIMEOUTS: usize = 10;

/// Tells when a timer of a shard that ticks every `interval` ran late: the shard did
/// not run for a while (the process was stopped, its core starved).
struct LateTicks {
    interval: Duration,
    last_tick: Instant,
}

impl LateTicks {
    /// A tick this much later than due means the shard was stalled.
    const LATE: Duration = Duration::from_secs(2);

    fn new(interval: Duration, now: Instant) -> LateTicks {
        LateTicks {
            interval,
            last_tick: now,
        }
    }

    /// How long the shard was away, if this tick (at `now`) shows it was stalled.
    fn stalled(&mut self, now: Instant) -> Option<Duration> {
        let gap = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        (gap > self.interval + Self::LATE).then_some(gap)
    }
}

/// A stall of the shard (its process stopped, its host frozen, its core starved) is not
/// its clients' silence: they may have sent nothing because they heard nothing (the
/// stock JS client pings only after it received something), and what they did send
/// still waits unread. So after a stall every silence clock starts again, and the
/// keep-alive pings that fall due at once ask the clients to speak up.
struct StallGuard {
    ticks: LateTicks,
}

impl StallGuard {
    fn new(now: Instant) -> StallGuard {
        StallGuard {
            ticks: LateTicks::new(TICK, now),
        }
    }

    /// Whether the shard was stalled before this tick (logged once per stall).
    fn stalled(&mut self, shard: usize, now: Instant) -> bool {
        let Some(gap) = self.ticks.stalled(now) else {
            return false;
        };
        tracing::warn!(
            shard,
            stalled_ms = gap.as_millis() as u64,
            "the shard did not run for a while; its clients' silence clocks start again"
        );
        true
    }
}

/// Once a second: keep-alive pings, client timeouts, the end of closes that could not
/// flush in time, SSE and long-polling connections without a handshake or a receive
/// request for too long, negotiated tokens never used, and (shard 0) overdue client
/// results.
async fn tick(state: Rc<ShardState>) {
    let config = &state.node.config;
    let pings: Vec<(FrameKind, Bytes)> = [HubProtocol::Json, HubProtocol::MessagePack]
        .into_iter()
        .flat_map(|protocol| Framing::ALL.map(|framing| FrameKind { protocol, framing }))
        .map(|kind| {
            let ping = frame::encode_framed(kind.protocol, kind.framing, &HubMessage::Ping);
            (kind, ping)
        })
        .collect();
    let mut interval = monoio::time::interval(TICK);
    let mut stall = StallGuard::new(Instant::now());
    loop {
        interval.tick().await;
        if state.shutdown.is_fired() {
            return;
        }
        let now = Instant::now();
        let stalled = stall.stalled(state.index, now);
        if state.index == 0 {
            // Node-wide, so once per node: client results whose answer is overdue.
            state.node.client_results.expire(now);
        }
        let mut timed_out = 0usize;
        for session in state.all_sessions() {
            // Between transports (stateful reconnect) the resume's own timeout applies.
            if session.is_detached() {
                continue;
            }
            session.acknowledge_client();
            if stalled {
                session.last_received.set(now);
            }
            if let Some(since) = session.closing_since() {
                if now - since > CLOSE_GRACE {
                    session.stop_now();
                }
                continue;
            }
            // Long polling keeps itself alive: no pings, no client timeout (the channel
            // check below disposes a connection whose polls stopped).
            if session.framing == Framing::Raw {
                continue;
            }
            if now - session.last_received.get() > config.client_timeout {
                timed_out += 1;
                session.ending(EndReason::ClientTimeout);
                session.close(
                    Some("Server timeout elapsed without receiving a message from the client."),
                    true,
                );
            } else if now - session.last_sent.get() >= config.keepalive
                && session.queued_bytes() == 0
            {
                if let Some((_, ping)) = pings.iter().find(|(kind, _)| *kind == session.kind()) {
                    session.last_sent.set(now);
                    session.enqueue_untracked(ping);
                }
            }
        }
        ShardMetrics::add(&state.metrics().client_timeouts, timed_out as u64);
        if timed_out >= MANY_TIMEOUTS {
            tracing::warn!(
                shard = state.index,
                connections = timed_out,
                "closed many connections at once for client timeouts (silent clients, or a \
                 network or host problem between them and this node)"
            );
        }
        for channel in state.tokens.channels() {
            if stalled && channel.receive_gone_since.get().is_some() {
                channel.receive_gone_since.set(Some(now));
            }
            let no_handshake =
                !channel.connected.get() && now - channel.created > HANDSHAKE_TIMEOUT;
            let receive_gone = channel
                .receive_gone_since
                .get()
                .is_some_and(|since| now - since > config.disconnect_timeout);
            if no_handshake || receive_gone {
                channel::dispose(&state, &channel);
            }
        }
        state
            .tokens
            .purge_negotiated(now, config.disconnect_timeout);
    }
}

/// How often a shard looks for slow consumers: a congested receiver slows its
/// publishers until it is closed, so it is closed at most this long after
/// `--slow-consumer-secs` (a check costs a comparison per session).
const SLOW_CONSUMER_CHECK: Duration = Duration::from_millis(100);

/// Closes the receivers that stayed congested for `--slow-consumer-secs`.
async fn slow_consumer_watch(state: Rc<ShardState>) {
    let allowed = state.node.config.slow_consumer;
    let mut interval = monoio::time::interval(SLOW_CONSUMER_CHECK);
    let mut late = LateTicks::new(SLOW_CONSUMER_CHECK, Instant::now());
    while !state.shutdown.is_fired() {
        interval.tick().await;
        let now = Instant::now();
        // A shard that did not run for a while (its process stopped, its core starved)
        // could not write: its receivers' clocks start again.
        let stalled = late.stalled(now).is_some();
        for session in state.all_sessions() {
            if session.closing_since().is_some() {
                continue;
            }
            if stalled {
                session.restart_slow_consumer_clocks(now);
            } else if let Some(why) = session.too_slow(now, SLOW_CONSUMER_CHECK, allowed) {
                session.close_as_slow(why);
            }
        }
    }
}

/// Every [`PRESENCE_INTERVAL`]: one `PresenceChanged` per changed watched group.
async fn presence_notifier(state: Rc<ShardState>) {
    let mut interval = monoio::time::interval(PRESENCE_INTERVAL);
    while !state.shutdown.is_fired() {
        interval.tick().await;
        state.notify_presence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_tick_shows_a_stall_once() {
        let start = Instant::now();
        let mut guard = StallGuard::new(start);
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        assert!(!guard.stalled(0, at(1.0)));
        assert!(!guard.stalled(0, at(2.1)), "a little late is not a stall");
        assert!(guard.stalled(0, at(9.0)), "7 s without a tick: stalled");
        assert!(
            !guard.stalled(0, at(9.0)),
            "the burst of overdue ticks after it is not another stall"
        );
        assert!(!guard.stalled(0, at(10.0)));
    }

    #[test]
    fn failed_accepts_pause_longer_and_log_once_per_interval() {
        let mut backoff = AcceptBackoff::default();
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        let start = Instant::now();
        let mut pauses = Vec::new();
        for i in 0..8 {
            pauses.push(backoff.failed(0, &error, start + Duration::from_millis(i * 100)));
        }
        assert_eq!(pauses[0], AcceptBackoff::FIRST_PAUSE);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), AcceptBackoff::MAX_PAUSE);
        assert_eq!(
            backoff.unlogged, 7,
            "one line for the first failure, then silence"
        );
        backoff.failed(0, &error, start + AcceptBackoff::LOG_EVERY);
        assert_eq!(
            backoff.unlogged, 0,
            "a line with the count after the interval"
        );
        backoff.succeeded(0);
        assert_eq!(backoff.total, 0);
        assert_eq!(
            backoff.failed(0, &error, start),
            AcceptBackoff::FIRST_PAUSE,
            "a success resets the pause"
        );
    }
}
