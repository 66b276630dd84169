//! The fan-out load: C receivers in G groups, P publishers sending numbered,
//! timestamped messages to the groups (as fast as the server completes them within a
//! window, or at a fixed rate). Receivers count deliveries, detect loss, duplication
//! and reordering per publisher, and record latency in an HdrHistogram. The report
//! includes the load generator's own CPU time per delivery.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use hdrhistogram::Histogram;
use monoio::io::AsyncWriteRentExt;
use serde::Serialize;

use ringhub_bench::client::{self, Wire};
use ringhub_bench::http_receiver::{self, ReceiverTransport};

#[derive(Parser, Clone, Debug)]
pub struct LoadArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub addr: SocketAddr,
    /// Receivers connect to these nodes in turn, every group's members spread over them
    /// (a cluster); publishers always use `--addr`. Default: `--addr`.
    #[arg(long, value_delimiter = ',')]
    pub receiver_addrs: Vec<SocketAddr>,
    #[arg(long, default_value = "chat")]
    pub hub: String,
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Blocking sends in flight per publisher.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Total sends per second over all publishers (default: as fast as completed).
    #[arg(long)]
    pub rate: Option<u64>,
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// `json`, `messagepack` (SignalR) or `socketio`.
    #[arg(long, default_value = "json")]
    pub protocol: String,
    /// How receivers get their messages: `websockets`, `sse` or `longpolling` (SignalR
    /// only; publishers always use WebSockets).
    #[arg(long, default_value = "websockets")]
    pub receivers: String,
    /// One receiver (of the first group) stops reading when the measurement starts and
    /// never reads again (the slow-reader workload): it is left out of the delivery
    /// counts, and the report says when the server closed it (ringhub's `/metrics`).
    #[arg(long)]
    pub stall_one: bool,
    /// Receivers negotiate stateful reconnect (handshake version 2) and acknowledge
    /// what they got once a second, as the JS client's `withStatefulReconnect()` does
    /// (SignalR over WebSockets only).
    #[arg(long)]
    pub stateful: bool,
    /// Pin the load generator to this core.
    #[arg(long)]
    pub core: Option<usize>,
    /// Print the report as one JSON line (for `ringhub-bench run`).
    #[arg(long)]
    pub json: bool,
}

/// What one fan-out run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadReport {
    pub protocol: String,
    /// The receivers' transport.
    pub receivers: String,
    pub connections: usize,
    pub joined: usize,
    pub groups: usize,
    pub publishers: usize,
    pub payload: usize,
    pub rate: Option<u64>,
    pub secs: f64,
    pub sent_per_sec: f64,
    pub deliveries_per_sec: f64,
    /// Over the whole run, after publishers stopped and in-flight messages drained.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Receivers the server closed (or that failed) before the end: a server that drops
    /// slow readers shows it here; their missing messages count as lost.
    pub disconnected: usize,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
    pub loadgen_cpu_ns_per_delivery: f64,
    pub loadgen_cpu_busy: f64,
    /// The longest a publisher waited for room in its window of sends in flight during
    /// the measurement (the server slowing it down), in milliseconds.
    pub publisher_stall_ms_max: f64,
    /// With `--stall-one`: seconds from the receiver's last read to the server's
    /// slow-consumer close (`None`: not closed, or the server has no such metric).
    pub stalled_closed_after_secs: Option<f64>,
}

impl LoadReport {
    pub fn line(&self) -> String {
        format!(
            "protocol={} receivers={} connections={} joined={} disconnected={} deliveries_per_sec={:.0} sent_per_sec={:.0} lost={} duplicated={} reordered={} latency_us p50={} p99={} p999={} max={} loadgen_cpu_ns_per_delivery={:.0} loadgen_cpu_busy={:.0}%",
            self.protocol,
            self.receivers,
            self.connections,
            self.joined,
            self.disconnected,
            self.deliveries_per_sec,
            self.sent_per_sec,
            self.lost,
            self.duplicated,
            self.reordered,
            self.latency_us_p50,
            self.latency_us_p99,
            self.latency_us_p999,
            self.latency_us_max,
            self.loadgen_cpu_ns_per_delivery,
            self.loadgen_cpu_busy,
        )
    }

    /// Sound: everyone joined, something arrived, nothing lost, duplicated or reordered.
    pub fn is_sound(&self) -> bool {
        self.joined == self.connections
            && self.delivered > 0
            && self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.disconnected == 0
    }
}

/// Counters shared by the tasks of one run (one thread: `Cell`s suffice).
struct Shared {
    epoch: Instant,
    delivered: Cell<u64>,
    duplicated: Cell<u64>,
    reordered: Cell<u64>,
    joined: Cell<usize>,
    disconnected: Cell<usize>,
    measuring: Cell<bool>,
    stop: Cell<bool>,
    latency: RefCell<Histogram<u64>>,
    /// Messages sent to each group (written to the socket).
    sent_to_group: RefCell<Vec<u64>>,
    sent: Cell<u64>,
    in_flight: Cell<u64>,
    publisher_stall_max: Cell<Duration>,
    /// When the stalled receiver stopped reading.
    stalled_at: Cell<Option<Instant>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What one receiver counts: its deliveries (per publisher, in order) and its join.
struct Tally {
    shared: Rc<Shared>,
    wire: Wire,
    joined: bool,
    /// Next expected sequence number per publisher.
    next: Vec<u64>,
    /// Whether its deliveries count (not for the receiver that stalls).
    counted: bool,
}

impl Tally {
    /// Counts what a frame's payload is; whether it is a message stateful reconnect
    /// tracks (a delivery, or the join's completion).
    fn take(&mut self, payload: &[u8]) -> bool {
        let shared = &self.shared;
        if !self.counted && self.joined {
            return false;
        }
        if let Some((publisher, seq, sent_ns)) = self.wire.delivery(payload) {
            if !self.counted {
                return true;
            }
            shared.delivered.set(shared.delivered.get() + 1);
            let Some(expected) = self.next.get_mut(publisher as usize) else {
                return true;
            };
            if seq == *expected {
                *expected += 1;
            } else if seq > *expected {
                shared.reordered.set(shared.reordered.get() + 1);
                *expected = seq + 1;
            } else {
                shared.duplicated.set(shared.duplicated.get() + 1);
            }
            if shared.measuring.get() {
                let micros = shared.now_ns().saturating_sub(sent_ns) / 1000;
                let _ = shared.latency.borrow_mut().record(micros.max(1));
            }
            true
        } else if !self.joined && self.wire.is_completion(payload) {
            self.joined = true;
            shared.joined.set(shared.joined.get() + 1);
            true
        } else {
            false
        }
    }

    /// The receiver ended: a disconnection unless the run is over.
    fn ended(&self) {
        if !self.shared.stop.get() {
            self.shared
                .disconnected
                .set(self.shared.disconnected.get() + 1);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receiver(
    args: Rc<LoadArgs>,
    addr: SocketAddr,
    wire: Wire,
    transport: ReceiverTransport,
    group: usize,
    stalls: bool,
    shared: Rc<Shared>,
) {
    let mut tally = Tally {
        shared,
        wire,
        joined: false,
        next: vec![0u64; args.publishers],
        counted: !stalls,
    };
    let group = format!("g{group}");
    if let (Wire::SignalR(protocol), false) = (wire, transport == ReceiverTransport::WebSockets) {
        let join = client::invocation_record(
            protocol,
            Some("j".into()),
            "JoinGroup",
            vec![ringhub_protocol::Value::Str(group)],
        );
        let received =
            http_receiver::receive(addr, &args.hub, protocol, transport, &join, |payload| {
                tally.take(payload);
            })
            .await;
        if let Err(error) = received {
            if !tally.joined {
                eprintln!("receiver could not connect: {error}");
            }
        }
        tally.ended();
        return;
    }
    let (mut stream, mut buf) = match client::open_with(addr, &args.hub, wire, args.stateful).await
    {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("receiver could not connect: {error}");
            return;
        }
    };
    if stream.write_all(wire.join(&group)).await.0.is_err() {
        return;
    }
    // Stateful reconnect: tracked messages received (deliveries and completions), and
    // when they were last acknowledged.
    let (mut tracked, mut acked, mut acked_at) = (0u64, 0u64, Instant::now());
    loop {
        if stalls && tally.shared.measuring.get() {
            // Stops reading for good; the socket stays open until the run ends.
            tally.shared.stalled_at.set(Some(Instant::now()));
            while !tally.shared.stop.get() {
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
            return;
        }
        if client::read(&mut stream, &mut buf).await.is_err() {
            tally.ended();
            return;
        }
        let mut replies = client::drain_frames(&mut buf, wire, |payload| {
            if tally.take(payload) {
                tracked += 1;
            }
        });
        if let (Wire::SignalR(protocol), true) = (wire, args.stateful) {
            if tracked > acked && acked_at.elapsed() >= Duration::from_secs(1) {
                replies.extend_from_slice(&client::ack_frame(protocol, tracked));
                (acked, acked_at) = (tracked, Instant::now());
            }
        }
        if !replies.is_empty() && stream.write_all(replies).await.0.is_err() {
            return;
        }
    }
}

/// Wakes the publisher's writer when completions free room in its window.
#[derive(Default)]
struct Room {
    waker: RefCell<Option<Waker>>,
}

impl Room {
    fn notify(&self) {
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    async fn wait(&self, ready: impl Fn() -> bool) {
        std::future::poll_fn(|cx| {
            if ready() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

async fn publisher(args: Rc<LoadArgs>, wire: Wire, index: usize, shared: Rc<Shared>) {
    let (stream, buf) = match client::open(args.addr, &args.hub, wire).await {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("publisher could not connect: {error}");
            return;
        }
    };
    let (reader, mut writer) = monoio::io::Splitable::into_split(stream);
    let in_flight = Rc::new(Cell::new(0usize));
    let room = Rc::new(Room::default());
    let pongs: Rc<RefCell<Vec<u8>>> = Rc::default();
    monoio::spawn(completions(
        reader,
        buf,
        wire,
        in_flight.clone(),
        room.clone(),
        shared.clone(),
        pongs.clone(),
    ));
    let payload = "x".repeat(args.payload);
    let groups: Vec<String> = (0..args.groups).map(|g| format!("g{g}")).collect();
    // At a fixed rate the publishers take turns: each fires every `publishers / rate`
    // seconds, shifted by its index, so sends are spread evenly instead of coming in
    // bursts on timer ticks.
    let pacer = match args.rate {
        Some(rate) => {
            let rate = rate.max(1) as f64;
            let interval = Duration::from_secs_f64(args.publishers as f64 / rate);
            let first = Duration::from_secs_f64((index + 1) as f64 / rate);
            match Pacer::new(interval, first) {
                Ok(pacer) => Some(pacer),
                Err(error) => {
                    eprintln!("publisher could not create its timer: {error}");
                    return;
                }
            }
        }
        None => None,
    };
    // Numbered per (publisher, group): each receiver sees one group, so it expects
    // every publisher's numbers for that group without gaps.
    let mut seq = vec![0u64; args.groups];
    let (mut owed, mut sent, mut next_group) = (0u64, 0u64, index);
    while !shared.stop.get() {
        let room_left = args.window - in_flight.get();
        let due = match &pacer {
            Some(pacer) => {
                if owed == sent {
                    match pacer.tick().await {
                        Ok(fired) => owed += fired,
                        Err(_) => return,
                    }
                }
                (owed - sent).min(room_left as u64) as usize
            }
            None => room_left,
        };
        if due == 0 {
            let window = args.window;
            let in_flight = in_flight.clone();
            let waited_from = Instant::now();
            room.wait(move || in_flight.get() < window).await;
            if shared.measuring.get() {
                let waited = waited_from.elapsed();
                if waited > shared.publisher_stall_max.get() {
                    shared.publisher_stall_max.set(waited);
                }
            }
            continue;
        }
        let mut batch = std::mem::take(&mut *pongs.borrow_mut());
        for _ in 0..due {
            let group = next_group % args.groups;
            next_group += 1;
            batch.extend_from_slice(&wire.publish(
                &groups[group],
                index as u32,
                seq[group],
                shared.now_ns(),
                &payload,
            ));
            seq[group] += 1;
            sent += 1;
            shared.sent_to_group.borrow_mut()[group] += 1;
        }
        in_flight.set(in_flight.get() + due);
        shared.sent.set(shared.sent.get() + due as u64);
        shared.in_flight.set(shared.in_flight.get() + due as u64);
        if writer.write_all(batch).await.0.is_err() {
            return;
        }
    }
}

/// A timer with microsecond precision (monoio's own has 1 ms ticks): a timerfd read
/// through the ring.
struct Pacer {
    timer: monoio::fs::File,
}

impl Pacer {
    fn new(interval: Duration, first: Duration) -> std::io::Result<Pacer> {
        use rustix::time::{
            timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
            TimerfdTimerFlags, Timespec,
        };
        let timespec = |d: Duration| Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        };
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC)?;
        timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: timespec(interval),
                it_value: timespec(first.max(Duration::from_nanos(1))),
            },
        )?;
        let timer = monoio::fs::File::from_std(std::fs::File::from(fd))?;
        Ok(Pacer { timer })
    }

    /// Waits for the next expiry; how many intervals passed since the last call.
    async fn tick(&self) -> std::io::Result<u64> {
        let (result, buf) = self.timer.read_at(vec![0u8; 8], 0).await;
        result?;
        let expirations = u64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
        Ok(expirations)
    }
}

async fn completions(
    mut reader: monoio::io::OwnedReadHalf<monoio::net::TcpStream>,
    mut buf: BytesMut,
    wire: Wire,
    in_flight: Rc<Cell<usize>>,
    room: Rc<Room>,
    shared: Rc<Shared>,
    pongs: Rc<RefCell<Vec<u8>>>,
) {
    loop {
        if client::read(&mut reader, &mut buf).await.is_err() {
            return;
        }
        let mut done = 0;
        let replies = client::drain_frames(&mut buf, wire, |payload| {
            if wire.is_completion(payload) {
                done += 1;
            }
        });
        pongs.borrow_mut().extend_from_slice(&replies);
        in_flight.set(in_flight.get().saturating_sub(done));
        shared
            .in_flight
            .set(shared.in_flight.get().saturating_sub(done as u64));
        room.notify();
    }
}

fn announce(event: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{{\"event\":\"{event}\"}}");
    let _ = out.flush();
}

/// CPU time (user + system) of a process in clock ticks (100 per second on Linux), from
/// `/proc/<pid>/stat`; this process when `pid` is `None`.
pub fn cpu_ticks(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the ")" that ends the command name: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    ticks(11) + ticks(12)
}

/// This process's CPU time.
pub fn cpu_time() -> Duration {
    Duration::from_millis(cpu_ticks(None) * 10)
}

/// Opens `count` connections gently (a pause every 100) so the accept queue keeps up.
pub async fn spawn_paced(count: usize, mut spawn: impl FnMut(usize)) {
    for i in 0..count {
        spawn(i);
        if i % 100 == 99 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

pub async fn run(args: LoadArgs, wire: Wire, receivers: ReceiverTransport) -> LoadReport {
    let args = Rc::new(args);
    let shared = Rc::new(Shared {
        epoch: Instant::now(),
        delivered: Cell::new(0),
        duplicated: Cell::new(0),
        reordered: Cell::new(0),
        joined: Cell::new(0),
        disconnected: Cell::new(0),
        measuring: Cell::new(false),
        stop: Cell::new(false),
        latency: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")),
        sent_to_group: RefCell::new(vec![0; args.groups]),
        sent: Cell::new(0),
        in_flight: Cell::new(0),
        publisher_stall_max: Cell::new(Duration::ZERO),
        stalled_at: Cell::new(None),
    });
    let receiver_addrs = if args.receiver_addrs.is_empty() {
        vec![args.addr]
    } else {
        args.receiver_addrs.clone()
    };
    spawn_paced(args.connections, |i| {
        monoio::spawn(receiver(
            args.clone(),
            receiver_addrs[(i / args.groups) % receiver_addrs.len()],
            wire,
            receivers,
            i % args.groups,
            args.stall_one && i == 0,
            shared.clone(),
        ));
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.joined.get() < args.connections && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in 0..args.publishers {
        monoio::spawn(publisher(args.clone(), wire, p, shared.clone()));
    }
    monoio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    shared.measuring.set(true);
    // `run` samples the server's CPU time at these two marks.
    if args.json {
        announce("measuring");
    }
    let (d0, s0, c0, t0) = (
        shared.delivered.get(),
        shared.sent.get(),
        cpu_time(),
        Instant::now(),
    );
    // The stalled receiver stops at its next read; the server's slow-consumer closes
    // are watched from here, on a thread (a blocking HTTP request each time).
    let slow_close = args.stall_one.then(|| {
        let addr = args.addr;
        let deadline = Duration::from_secs(args.duration_secs + 5);
        std::thread::spawn(move || watch_slow_consumer_close(addr, t0, deadline))
    });
    monoio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let (d1, s1, c1, t1) = (
        shared.delivered.get(),
        shared.sent.get(),
        cpu_time(),
        Instant::now(),
    );
    shared.measuring.set(false);
    if args.json {
        announce("measured");
    }
    // Stop sending, let what was sent arrive, then count what is missing.
    shared.stop.set(true);
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    let members = |group: usize| {
        let members = (args.connections + args.groups - 1 - group) / args.groups;
        // The stalled receiver (the first, in group 0) is not counted.
        members - usize::from(args.stall_one && group == 0)
    };
    let expected = || -> u64 {
        shared
            .sent_to_group
            .borrow()
            .iter()
            .enumerate()
            .map(|(g, sent)| sent * members(g) as u64)
            .sum()
    };
    let stalled_closed_after_secs = slow_close
        .and_then(|watch| watch.join().ok().flatten())
        .zip(shared.stalled_at.get())
        .map(|(closed, stalled)| closed.saturating_duration_since(stalled).as_secs_f64());
    let mut quiet_since = Instant::now();
    let mut last = shared.delivered.get();
    while Instant::now() < drain_deadline {
        monoio::time::sleep(Duration::from_millis(50)).await;
        let now = shared.delivered.get();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        let settled = shared.in_flight.get() == 0 && now - shared.duplicated.get() >= expected();
        if settled || quiet_since.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let secs = (t1 - t0).as_secs_f64();
    let deliveries = d1 - d0;
    let delivered = shared.delivered.get();
    let expected = expected();
    let unique = delivered - shared.duplicated.get();
    let latency = shared.latency.borrow();
    LoadReport {
        protocol: wire.name().to_owned(),
        receivers: args.receivers.clone(),
        connections: args.connections,
        joined: shared.joined.get(),
        groups: args.groups,
        publishers: args.publishers,
        payload: args.payload,
        rate: args.rate,
        secs,
        sent_per_sec: (s1 - s0) as f64 / secs,
        deliveries_per_sec: deliveries as f64 / secs,
        expected,
        delivered,
        lost: expected.saturating_sub(unique),
        duplicated: shared.duplicated.get(),
        reordered: shared.reordered.get(),
        disconnected: shared.disconnected.get(),
        latency_us_p50: latency.value_at_quantile(0.5),
        latency_us_p99: latency.value_at_quantile(0.99),
        latency_us_p999: latency.value_at_quantile(0.999),
        latency_us_max: latency.max(),
        loadgen_cpu_ns_per_delivery: if deliveries > 0 {
            (c1 - c0).as_nanos() as f64 / deliveries as f64
        } else {
            0.0
        },
        loadgen_cpu_busy: 100.0 * (c1 - c0).as_secs_f64() / secs,
        publisher_stall_ms_max: shared.publisher_stall_max.get().as_secs_f64() * 1000.0,
        stalled_closed_after_secs,
    }
}

/// Polls the server's `/metrics` until `ringhub_slow_consumer_closes_total` counts a
/// close or `deadline` passed since `from`; when the count rose (`None`: it did not, or
/// the server has no such metric).
fn watch_slow_consumer_close(
    addr: SocketAddr,
    from: Instant,
    deadline: Duration,
) -> Option<Instant> {
    use std::io::{Read, Write};
    let closes = || -> Option<u64> {
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        answer
            .lines()
            .find_map(|l| l.strip_prefix("ringhub_slow_consumer_closes_total "))
            .and_then(|v| v.trim().parse().ok())
    };
    let before = closes()?;
    while from.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        if closes()? > before {
            return Some(Instant::now());
        }
    }
    None
}
