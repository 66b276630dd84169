//! Counters for `/metrics` (contract section 8). Each shard writes only its own
//! cache-padded block, so counting on the hot path never contends between cores;
//! a scrape sums the blocks.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// One shard's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    pub connections: AtomicI64,
    /// Connections in the HTTP phase (requests, before an upgrade or a stream).
    pub http_connections: AtomicI64,
    pub messages_received: AtomicU64,
    pub deliveries: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Stateful reconnect: sessions resumed on a new WebSocket, resumes refused, and
    /// frames sent again on resume.
    pub resumes: AtomicU64,
    pub resumes_refused: AtomicU64,
    pub replayed_messages: AtomicU64,
}

impl ShardMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// A shard's metrics block, reachable from its sessions.
pub struct MetricsRef(pub std::sync::Arc<Metrics>, pub usize);

impl MetricsRef {
    pub fn get(&self) -> &ShardMetrics {
        &self.0.shards[self.1]
    }
}

/// All shards' counters.
#[derive(Debug)]
pub struct Metrics {
    pub shards: Vec<ShardMetrics>,
    /// 1 while the backplane is connected to Redis (always 0 without `--redis`).
    pub backplane_connected: AtomicU64,
    /// What could not be published to (or was lost on the way from) Redis.
    pub backplane_errors: AtomicU64,
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            backplane_connected: AtomicU64::new(0),
            backplane_errors: AtomicU64::new(0),
        }
    }

    fn sum(&self, counter: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| counter(s).load(Relaxed)).sum()
    }

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
        let counters: [(&str, &str, u64); 9] = [
            (
                "ringhub_backplane_errors_total",
                "Messages that could not be published to, or were lost from, the Redis backplane.",
                self.backplane_errors.load(Relaxed),
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
                "Resumes refused (another user, or too much unacknowledged).",
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
        out
    }
}
