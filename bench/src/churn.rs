//! Membership churn: every connection alternates `JoinGroup` and `LeaveGroup` as fast
//! as the server completes them.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use monoio::io::AsyncWriteRentExt;
use ringhub_protocol::hub::HubProtocol;
use ringhub_protocol::Value;
use serde::Serialize;

use crate::loadgen::{cpu_time, spawn_paced};
use ringhub_bench::client::{self, invocation_frame, Wire};

#[derive(Parser, Clone, Debug)]
pub struct ChurnArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub addr: SocketAddr,
    #[arg(long, default_value = "chat")]
    pub hub: String,
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// Groups the connections spread over.
    #[arg(long, default_value_t = 50)]
    pub groups: usize,
    /// Blocking invocations in flight per connection.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Pin the load generator to this core.
    #[arg(long)]
    pub core: Option<usize>,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub connections: usize,
    pub connected: usize,
    pub groups: usize,
    pub window: usize,
    pub secs: f64,
    pub ops_per_sec: f64,
    pub loadgen_cpu_busy: f64,
}

impl ChurnReport {
    pub fn line(&self) -> String {
        format!(
            "workload=churn connections={} connected={} groups={} window={} secs={:.1} ops_per_sec={:.0} loadgen_cpu_busy={:.0}%",
            self.connections, self.connected, self.groups, self.window, self.secs, self.ops_per_sec, self.loadgen_cpu_busy
        )
    }
}

/// One churning connection: JoinGroup/LeaveGroup of its group, `window` in flight.
async fn churner(args: Rc<ChurnArgs>, index: usize, done: Rc<Cell<u64>>, ready: Rc<Cell<usize>>) {
    let protocol = HubProtocol::Json;
    let wire = Wire::SignalR(protocol);
    let (stream, mut buf) = match client::open(args.addr, &args.hub, wire).await {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("churner could not connect: {error}");
            return;
        }
    };
    ready.set(ready.get() + 1);
    let group = Value::Str(format!("churn{}", index % args.groups));
    let pair: Vec<u8> = [
        invocation_frame(protocol, Some("j".into()), "JoinGroup", vec![group.clone()]),
        invocation_frame(protocol, Some("l".into()), "LeaveGroup", vec![group]),
    ]
    .concat();
    let (mut reader, mut writer) = monoio::io::Splitable::into_split(stream);
    let mut in_flight = 0;
    loop {
        // Whole join+leave pairs, so the connection ends each window outside the group.
        let mut batch = Vec::new();
        while in_flight + 2 <= args.window.max(2) {
            batch.extend_from_slice(&pair);
            in_flight += 2;
        }
        if !batch.is_empty() && writer.write_all(batch).await.0.is_err() {
            return;
        }
        if client::read(&mut reader, &mut buf).await.is_err() {
            return;
        }
        let mut completed = 0;
        client::drain_frames(&mut buf, wire, |payload| {
            if wire.is_completion(payload) {
                completed += 1;
            }
        });
        in_flight = in_flight.saturating_sub(completed);
        done.set(done.get() + completed as u64);
    }
}

pub async fn run(args: ChurnArgs) -> ChurnReport {
    let args = Rc::new(args);
    let done = Rc::new(Cell::new(0u64));
    let ready = Rc::new(Cell::new(0usize));
    spawn_paced(args.connections, |i| {
        monoio::spawn(churner(args.clone(), i, done.clone(), ready.clone()));
    })
    .await;
    monoio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let (o0, c0, t0) = (done.get(), cpu_time(), Instant::now());
    monoio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let (o1, c1, t1) = (done.get(), cpu_time(), Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    ChurnReport {
        connections: args.connections,
        connected: ready.get(),
        groups: args.groups,
        window: args.window,
        secs,
        ops_per_sec: (o1 - o0) as f64 / secs,
        loadgen_cpu_busy: 100.0 * (c1 - c0).as_secs_f64() / secs,
    }
}

/// Idle connections: open them, say how long that took, hold them.
#[derive(Parser, Clone, Debug)]
pub struct IdleArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub addr: SocketAddr,
    #[arg(long, default_value = "chat")]
    pub hub: String,
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// `json`, `messagepack` or `socketio`.
    #[arg(long, default_value = "json")]
    pub protocol: String,
    /// How long to hold them after the report line.
    #[arg(long, default_value_t = 3600)]
    pub hold_secs: u64,
    #[arg(long)]
    pub core: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub connections: usize,
    pub connected: usize,
    pub connect_secs: f64,
}

pub async fn idle(args: IdleArgs, wire: Wire) -> IdleReport {
    let args = Rc::new(args);
    let connected = Rc::new(Cell::new(0usize));
    let failed = Rc::new(Cell::new(0usize));
    let started = Instant::now();
    spawn_paced(args.connections, |_| {
        let (args, connected, failed) = (args.clone(), connected.clone(), failed.clone());
        monoio::spawn(async move {
            match client::open(args.addr, &args.hub, wire).await {
                Ok((stream, mut buf)) => {
                    connected.set(connected.get() + 1);
                    // Hold it, answering Socket.IO pings so the server keeps it.
                    let (mut reader, mut writer) = monoio::io::Splitable::into_split(stream);
                    while client::read(&mut reader, &mut buf).await.is_ok() {
                        let replies = client::drain_frames(&mut buf, wire, |_| {});
                        if !replies.is_empty() && writer.write_all(replies).await.0.is_err() {
                            break;
                        }
                    }
                }
                Err(error) => {
                    // The first failure says why (the rest are usually the same).
                    if failed.get() == 0 {
                        eprintln!("idle: a connection failed: {error}");
                    }
                    failed.set(failed.get() + 1);
                }
            }
        });
    })
    .await;
    while connected.get() + failed.get() < args.connections {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    IdleReport {
        connections: args.connections,
        connected: connected.get(),
        connect_secs: started.elapsed().as_secs_f64(),
    }
}
