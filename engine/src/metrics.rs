//! Counters for `/metrics` (contract section 8). Each shard writes only its own
//! cache-padded block, so counting on the hot path never contends between cores;
//! a scrape sums the blocks. The process metrics (memory, CPU, descriptors, start
//! time) are the `prometheus` crate's process collector, read from `/proc` per scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus::core::Collector;

use crate::upstream::rules::Category;

/// Upper bounds (seconds) of the connection-duration histogram's buckets: from a page
/// that reconnects at once to a tab left open for a day.
const DURATION_BUCKETS: [u64; 8] = [1, 10, 60, 300, 1800, 3600, 14400, 86400];

/// One shard's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// Open SignalR connections (`ringhub_connections`, a gauge per shard: an uneven
    /// spread shows here).
    pub connections: AtomicI64,
    /// Connections that completed their handshake (their ends are the duration
    /// histogram's count).
    pub connects: AtomicU64,
    /// Connections in the HTTP phase (requests, before an upgrade or a stream).
    pub http_connections: AtomicI64,
    /// Hub messages received from clients (`ringhub_messages_received_total`).
    pub messages_received: AtomicU64,
    /// Frames handed to sockets (`ringhub_deliveries_total`): a broadcast to n
    /// connections counts n.
    pub deliveries: AtomicU64,
    /// Bytes written to sockets (`ringhub_bytes_sent_total`).
    pub bytes_sent: AtomicU64,
    /// Connections closed for reading too slowly, past `--slow-consumer-secs`
    /// (`ringhub_slow_consumer_closes_total`).
    pub slow_consumer_closes: AtomicU64,
    /// Connections closed for malformed input (`ringhub_protocol_errors_total`).
    pub protocol_errors: AtomicU64,
    /// Stateful reconnect: sessions resumed on a new WebSocket
    /// (`ringhub_resumes_total`).
    pub resumes: AtomicU64,
    /// Resumes refused (another user, too much unacknowledged) and resume windows that
    /// passed (`ringhub_resumes_refused_total`).
    pub resumes_refused: AtomicU64,
    /// Frames sent again on resumed connections (`ringhub_replayed_messages_total`).
    pub replayed_messages: AtomicU64,
    /// Connections closed for silence past `--client-timeout-secs`.
    pub client_timeouts: AtomicU64,
    /// How long connections lasted: a count per bucket of [`DURATION_BUCKETS`] (and one
    /// for longer), and the sum in milliseconds.
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    durations_millis: AtomicU64,
}

impl ShardMetrics {
    /// Adds `n` to one of a shard's counters. Relaxed: each counter is written by its
    /// own shard only and read by scrapes, which need no ordering with anything else.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A connection of this shard ended after `lasted`.
    pub fn connection_ended(&self, lasted: Duration) {
        let secs = lasted.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| secs <= bound as f64)
            .unwrap_or(DURATION_BUCKETS.len());
        self.durations[bucket].fetch_add(1, Relaxed);
        self.durations_millis
            .fetch_add(lasted.as_millis() as u64, Relaxed);
    }
}

/// A shard's metrics block, reachable from its sessions.
pub struct MetricsRef(
    /// The node's metrics.
    pub std::sync::Arc<Metrics>,
    /// The shard's index in [`Metrics::shards`].
    pub usize,
);

impl MetricsRef {
    /// The shard's own counters.
    pub fn get(&self) -> &ShardMetrics {
        &self.0.shards[self.1]
    }
}

/// All shards' counters.
pub struct Metrics {
    /// One block per shard, in shard order; a scrape sums them.
    pub shards: Vec<ShardMetrics>,
    /// 1 while the backplane is connected to Redis (always 0 without `--redis`).
    pub backplane_connected: AtomicU64,
    /// What could not be published to (or was lost on the way from) Redis.
    pub backplane_errors: AtomicU64,
    /// Times the backplane came back after Redis was unreachable.
    pub backplane_reconnects: AtomicU64,
    /// Messages from the backplane dropped as malformed (not a backplane message, or a
    /// send whose records are not whole invocations within the message limit).
    pub backplane_rejected: AtomicU64,
    /// 1 when the shards run on io_uring, 0 on the epoll fallback.
    pub io_uring: AtomicU64,
    /// Requests refused for a missing, invalid or expired access token (401).
    pub auth_failures: AtomicU64,
    /// Upstream connection events dropped after their retries, and invocations their
    /// upstream did not answer with a 2xx: by category (connections, messages).
    upstream_failures: [AtomicU64; 2],
    process: prometheus::process_collector::ProcessCollector,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Zeroed counters for `shards` shards, `io_uring` at 1 until a shard falls back.
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            backplane_connected: AtomicU64::new(0),
            backplane_errors: AtomicU64::new(0),
            backplane_reconnects: AtomicU64::new(0),
            backplane_rejected: AtomicU64::new(0),
            io_uring: AtomicU64::new(1),
            auth_failures: AtomicU64::new(0),
            upstream_failures: Default::default(),
            process: prometheus::process_collector::ProcessCollector::for_self(),
        }
    }

    /// An upstream event was dropped, or an upstream invocation failed.
    pub fn upstream_failed(&self, category: Category) {
        let index = match category {
            Category::Connections => 0,
            Category::Messages => 1,
        };
        self.upstream_failures[index].fetch_add(1, Relaxed);
    }

    fn sum(&self, counter: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| counter(s).load(Relaxed)).sum()
    }

    /// Open SignalR connections over all shards, now (a sum of gauges read one by one,
    /// so exact only when nothing connects meanwhile).
    pub fn connections(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.connections.load(Relaxed))
            .sum()
    }

    /// The Prometheus text exposition; `groups` is the number of groups with members
    /// over all shards (from the presence registry).
    pub fn render(&self, groups: usize) -> String {
        let mut out = String::with_capacity(1024);
        let per_shard =
            |out: &mut String, name: &str, help: &str, gauge: fn(&ShardMetrics) -> i64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (i, shard) in self.shards.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", gauge(shard));
                }
            };
        per_shard(
            &mut out,
            "ringhub_connections",
            "Open SignalR connections.",
            |s| s.connections.load(Relaxed),
        );
        per_shard(
            &mut out,
            "ringhub_http_connections",
            "Connections in the HTTP phase (requests, before an upgrade or a stream).",
            |s| s.http_connections.load(Relaxed),
        );
        out.push_str(
            "# HELP ringhub_groups Groups with at least one member.\n# TYPE ringhub_groups gauge\n",
        );
        let _ = writeln!(out, "ringhub_groups {groups}");
        let _ = writeln!(
            out,
            "# HELP ringhub_backplane_connected 1 while the Redis backplane is connected.\n# TYPE ringhub_backplane_connected gauge\nringhub_backplane_connected {}",
            self.backplane_connected.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ringhub_io_uring 1 when the shards run on io_uring, 0 on the epoll fallback.\n# TYPE ringhub_io_uring gauge\nringhub_io_uring {}",
            self.io_uring.load(Relaxed)
        );
        let counters: [(&str, &str, u64); 14] = [
            (
                "ringhub_connects_total",
                "Connections that completed their handshake (their ends: ringhub_connection_duration_seconds_count).",
                self.sum(|s| &s.connects),
            ),
            (
                "ringhub_auth_failures_total",
                "Requests refused for a missing, invalid or expired access token (401).",
                self.auth_failures.load(Relaxed),
            ),
            (
                "ringhub_backplane_rejected_total",
                "Messages from the backplane dropped as malformed.",
                self.backplane_rejected.load(Relaxed),
            ),
            (
                "ringhub_backplane_errors_total",
                "Messages that could not be published to, or were lost from, the Redis backplane.",
                self.backplane_errors.load(Relaxed),
            ),
            (
                "ringhub_backplane_reconnects_total",
                "Times the backplane came back after Redis was unreachable.",
                self.backplane_reconnects.load(Relaxed),
            ),
            (
                "ringhub_client_timeouts_total",
                "Connections closed for silence past --client-timeout-secs.",
                self.sum(|s| &s.client_timeouts),
            ),
            (
                "ringhub_messages_received_total",
                "Hub messages received from clients.",
                self.sum(|s| &s.messages_received),
            ),
            (
                "ringhub_deliveries_total",
                "Frames handed to sockets.",
                self.sum(|s| &s.deliveries),
            ),
            (
                "ringhub_bytes_sent_total",
                "Bytes written to sockets.",
                self.sum(|s| &s.bytes_sent),
            ),
            (
                "ringhub_slow_consumer_closes_total",
                "Connections closed for reading too slowly.",
                self.sum(|s| &s.slow_consumer_closes),
            ),
            (
                "ringhub_protocol_errors_total",
                "Connections closed for malformed input.",
                self.sum(|s| &s.protocol_errors),
            ),
            (
                "ringhub_resumes_total",
                "Connections resumed on a new WebSocket (stateful reconnect).",
                self.sum(|s| &s.resumes),
            ),
            (
                "ringhub_resumes_refused_total",
                "Resumes refused (another user, too much unacknowledged) and resume windows that passed (--disconnect-timeout-secs).",
                self.sum(|s| &s.resumes_refused),
            ),
            (
                "ringhub_replayed_messages_total",
                "Messages sent again on resumed connections.",
                self.sum(|s| &s.replayed_messages),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let name = "ringhub_upstream_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} Upstream connection events dropped after their retries, and upstream invocations without a 2xx answer.\n# TYPE {name} counter"
        );
        for (category, count) in ["connections", "messages"]
            .iter()
            .zip(&self.upstream_failures)
        {
            let _ = writeln!(
                out,
                "{name}{{category=\"{category}\"}} {}",
                count.load(Relaxed)
            );
        }
        self.render_durations(&mut out);
        // The process collector reads /proc; a scrape that cannot is left without them.
        if let Ok(text) = prometheus::TextEncoder::new().encode_to_string(&self.process.collect()) {
            out.push_str(&text);
        }
        out
    }

    fn render_durations(&self, out: &mut String) {
        let name = "ringhub_connection_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} How long connections lasted.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            cumulative += self.sum(|s| &s.durations[i]);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.sum(|s| &s.durations[DURATION_BUCKETS.len()]);
        let millis = self.sum(|s| &s.durations_millis);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}.{:03}", millis / 1000, millis % 1000);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_contracts_metrics_and_the_process_ones() {
        let metrics = Metrics::new(2);
        metrics.shards[0].connection_ended(Duration::from_millis(500));
        metrics.shards[1].connection_ended(Duration::from_secs(90));
        metrics.shards[1].connection_ended(Duration::from_secs(200_000));
        ShardMetrics::add(&metrics.shards[0].client_timeouts, 2);
        metrics.upstream_failed(Category::Messages);
        let text = metrics.render(0);
        for line in [
            "ringhub_connection_duration_seconds_bucket{le=\"1\"} 1",
            "ringhub_connection_duration_seconds_bucket{le=\"60\"} 1",
            "ringhub_connection_duration_seconds_bucket{le=\"300\"} 2",
            "ringhub_connection_duration_seconds_bucket{le=\"+Inf\"} 3",
            "ringhub_connection_duration_seconds_sum 200090.500",
            "ringhub_connection_duration_seconds_count 3",
            "ringhub_client_timeouts_total 2",
            "ringhub_backplane_reconnects_total 0",
            "ringhub_upstream_failures_total{category=\"connections\"} 0",
            "ringhub_upstream_failures_total{category=\"messages\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} in\n{text}"
            );
        }
    }
}
