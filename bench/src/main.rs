//! `ringhub-bench`: fan-out load against a SignalR server over loopback.
//!
//! `loadgen` opens C connections, joins them to G groups, and runs P publishers that
//! send `SendToGroup` as fast as the server completes them (a window of blocking
//! invocations each); receivers count the deliveries. It reports deliveries per second
//! over the measured window and its own CPU time per delivery, so the load generator's
//! own cost is visible. `churn` measures JoinGroup/LeaveGroup operations per second.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use clap::{Parser, Subcommand};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use ringhub_protocol::hub::{HubMessage, HubProtocol, Invocation};
use ringhub_protocol::ws::{encode_client_frame, parse_server_frame_header, Opcode};
use ringhub_protocol::Value;

#[derive(Parser)]
#[command(
    name = "ringhub-bench",
    about = "Fan-out benchmarks for SignalR servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fan-out load against a running server.
    Loadgen(LoadArgs),
    /// Membership churn: every connection alternates JoinGroup and LeaveGroup as fast
    /// as the server completes them; reports operations per second.
    Churn(ChurnArgs),
}

#[derive(Parser, Clone)]
struct ChurnArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    addr: SocketAddr,
    #[arg(long, default_value = "chat")]
    hub: String,
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Groups the connections spread over.
    #[arg(long, default_value_t = 50)]
    groups: usize,
    /// Blocking invocations in flight per connection.
    #[arg(long, default_value_t = 4)]
    window: usize,
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Pin the load generator to this core.
    #[arg(long)]
    core: Option<usize>,
}

#[derive(Parser, Clone)]
struct LoadArgs {
    #[arg(long, default_value = "127.0.0.1:5000")]
    addr: SocketAddr,
    #[arg(long, default_value = "chat")]
    hub: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    groups: usize,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Blocking invocations in flight per publisher.
    #[arg(long, default_value_t = 16)]
    window: usize,
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// `json` or `messagepack`.
    #[arg(long, default_value = "json")]
    protocol: String,
    /// Pin the load generator to this core.
    #[arg(long)]
    core: Option<usize>,
}

fn main() {
    let command = Cli::parse().command;
    let core = match &command {
        Command::Loadgen(args) => args.core,
        Command::Churn(args) => args.core,
    };
    if let Some(core) = core {
        let _ = monoio::utils::bind_to_cpu_set([core]);
    }
    let mut runtime = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(4096)
        .enable_timer()
        .build()
        .expect("io_uring runtime");
    let (report, healthy) = match command {
        Command::Loadgen(args) => {
            let Some(protocol) = HubProtocol::from_name(&args.protocol) else {
                eprintln!("ringhub-bench: --protocol: must be json or messagepack");
                std::process::exit(2);
            };
            runtime.block_on(run(args.clone(), protocol))
        }
        Command::Churn(args) => runtime.block_on(churn(args)),
    };
    println!("{report}");
    if !healthy {
        eprintln!("ringhub-bench: not every connection was set up, or nothing completed");
        std::process::exit(1);
    }
}

/// One churning connection: JoinGroup/LeaveGroup of its group, `window` in flight.
async fn churner(args: ChurnArgs, index: usize, done: Rc<Cell<u64>>, ready: Rc<Cell<usize>>) {
    let protocol = HubProtocol::Json;
    let (stream, mut buf) = match open(args.addr, &args.hub, protocol).await {
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
        if !batch.is_empty() {
            let (result, _) = writer.write_all(batch).await;
            if result.is_err() {
                return;
            }
        }
        if read(&mut reader, &mut buf).await.is_err() {
            return;
        }
        let completed = count_frames(&mut buf);
        in_flight = in_flight.saturating_sub(completed as usize);
        done.set(done.get() + completed);
    }
}

async fn churn(args: ChurnArgs) -> (String, bool) {
    let done = Rc::new(Cell::new(0u64));
    let ready = Rc::new(Cell::new(0usize));
    for i in 0..args.connections {
        monoio::spawn(churner(args.clone(), i, done.clone(), ready.clone()));
        if i % 100 == 99 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    monoio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let (o0, c0, t0) = (done.get(), cpu_time(), Instant::now());
    monoio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let (o1, c1, t1) = (done.get(), cpu_time(), Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    let report = format!(
        "workload=churn connections={} connected={} groups={} window={} secs={:.1} ops_per_sec={:.0} loadgen_cpu_busy={:.0}%",
        args.connections,
        ready.get(),
        args.groups,
        args.window,
        secs,
        (o1 - o0) as f64 / secs,
        100.0 * (c1 - c0).as_secs_f64() / secs,
    );
    (report, ready.get() == args.connections && o1 > o0)
}

/// Connection setup: upgrade, handshake, then the bytes after the handshake answer.
async fn open(
    addr: SocketAddr,
    hub: &str,
    protocol: HubProtocol,
) -> std::io::Result<(TcpStream, BytesMut)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let head = format!(
        "GET /hubs/{} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        hub
    );
    let (result, _) = stream.write_all(head.into_bytes()).await;
    result?;
    let mut buf = BytesMut::with_capacity(8192);
    // Like a browser, send the SignalR handshake only after the 101 (some servers,
    // tungstenite among them, refuse bytes pipelined behind the upgrade request).
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        read(&mut stream, &mut buf).await?;
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&buf[..end]).into_owned(),
        ));
    }
    buf.advance(end + 4);
    let handshake = format!(
        "{{\"protocol\":\"{}\",\"version\":1}}\u{1e}",
        protocol.name()
    );
    let mut frame = BytesMut::new();
    encode_client_frame(
        Opcode::Text,
        true,
        handshake.as_bytes(),
        [1, 2, 3, 4],
        &mut frame,
    );
    let (result, _) = stream.write_all(frame.to_vec()).await;
    result?;
    // The first frame is the handshake answer.
    loop {
        if let Some((_, _, header, len)) = parse_server_frame_header(&buf) {
            if buf.len() >= header + len {
                buf.advance(header + len);
                return Ok((stream, buf));
            }
        }
        read(&mut stream, &mut buf).await?;
    }
}

/// Appends what the socket has to `buf`; an error at end of stream.
async fn read(stream: &mut impl AsyncReadRent, buf: &mut BytesMut) -> std::io::Result<()> {
    buf.reserve(16 * 1024);
    let (start, end) = (buf.len(), buf.capacity());
    let (result, slice) = stream.read(std::mem::take(buf).slice_mut(start..end)).await;
    *buf = slice.into_inner();
    match result? {
        0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

/// Removes every complete frame from `buf`; returns how many data frames there were.
fn count_frames(buf: &mut BytesMut) -> u64 {
    let mut frames = 0;
    while let Some((_, opcode, header, len)) = parse_server_frame_header(buf) {
        if buf.len() < header + len {
            break;
        }
        if matches!(opcode, Opcode::Text | Opcode::Binary) {
            frames += 1;
        }
        buf.advance(header + len);
    }
    frames
}

fn invocation_frame(
    protocol: HubProtocol,
    id: Option<String>,
    target: &str,
    arguments: Vec<Value>,
) -> Vec<u8> {
    let message = HubMessage::Invocation(Invocation {
        invocation_id: id,
        target: target.into(),
        arguments,
        ..Invocation::default()
    });
    let mut record = BytesMut::new();
    protocol.encode(&message, &mut record);
    let mut frame = BytesMut::new();
    encode_client_frame(protocol.opcode(), true, &record, [9, 8, 7, 6], &mut frame);
    frame.to_vec()
}

async fn receiver(
    args: LoadArgs,
    protocol: HubProtocol,
    group: usize,
    count: Rc<Cell<u64>>,
    ready: Rc<Cell<usize>>,
) {
    let (mut stream, mut buf) = match open(args.addr, &args.hub, protocol).await {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("receiver could not connect: {error}");
            return;
        }
    };
    let join = invocation_frame(
        protocol,
        Some("j".into()),
        "JoinGroup",
        vec![Value::Str(format!("g{group}"))],
    );
    let (result, _) = stream.write_all(join).await;
    if result.is_err() {
        return;
    }
    // The join's completion is the first data frame.
    while count_frames(&mut buf) == 0 {
        if read(&mut stream, &mut buf).await.is_err() {
            return;
        }
    }
    ready.set(ready.get() + 1);
    loop {
        if read(&mut stream, &mut buf).await.is_err() {
            return;
        }
        count.set(count.get() + count_frames(&mut buf));
    }
}

async fn publisher(
    args: LoadArgs,
    protocol: HubProtocol,
    index: usize,
    sent: Rc<Cell<u64>>,
    stop: Rc<Cell<bool>>,
) {
    let (stream, mut buf) = match open(args.addr, &args.hub, protocol).await {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("publisher could not connect: {error}");
            return;
        }
    };
    let payload = "x".repeat(args.payload);
    // Prebuilt frames, one per group, so publishing costs a write, not an encode.
    let frames: Vec<Vec<u8>> = (0..args.groups)
        .map(|g| {
            invocation_frame(
                protocol,
                Some("p".into()),
                "SendToGroup",
                vec![
                    Value::Str(format!("g{g}")),
                    Value::from("receive"),
                    Value::Array(vec![Value::Str(payload.clone())]),
                ],
            )
        })
        .collect();
    let (mut reader, mut writer) = monoio::io::Splitable::into_split(stream);
    let in_flight = Rc::new(Cell::new(0usize));
    let mut next = index;
    loop {
        if stop.get() {
            return;
        }
        // Fill the window in one write.
        let mut batch = Vec::new();
        while in_flight.get() < args.window {
            batch.extend_from_slice(&frames[next % args.groups]);
            next += 1;
            in_flight.set(in_flight.get() + 1);
            sent.set(sent.get() + 1);
        }
        if !batch.is_empty() {
            let (result, _) = writer.write_all(batch).await;
            if result.is_err() {
                return;
            }
        }
        if read(&mut reader, &mut buf).await.is_err() {
            return;
        }
        let done = count_frames(&mut buf) as usize;
        in_flight.set(in_flight.get().saturating_sub(done));
    }
}

/// This process's CPU time (user + system), from /proc/self/stat in clock ticks
/// (100 per second on Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The report line, and whether the run was sound (all joined, something delivered).
async fn run(args: LoadArgs, protocol: HubProtocol) -> (String, bool) {
    let delivered = Rc::new(Cell::new(0u64));
    let ready = Rc::new(Cell::new(0usize));
    for i in 0..args.connections {
        monoio::spawn(receiver(
            args.clone(),
            protocol,
            i % args.groups,
            delivered.clone(),
            ready.clone(),
        ));
        if i % 100 == 99 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.get() < args.connections && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    let joined = ready.get();
    let sent = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    for p in 0..args.publishers {
        monoio::spawn(publisher(
            args.clone(),
            protocol,
            p,
            sent.clone(),
            stop.clone(),
        ));
    }
    monoio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let (d0, s0, c0, t0) = (delivered.get(), sent.get(), cpu_time(), Instant::now());
    monoio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let (d1, s1, c1, t1) = (delivered.get(), sent.get(), cpu_time(), Instant::now());
    stop.set(true);
    let secs = (t1 - t0).as_secs_f64();
    let deliveries = d1 - d0;
    let cpu_ns_per_delivery = if deliveries > 0 {
        (c1 - c0).as_nanos() as f64 / deliveries as f64
    } else {
        0.0
    };
    let report = format!(
        "protocol={} connections={} joined={} groups={} publishers={} payload={} secs={:.1} sent_per_sec={:.0} deliveries_per_sec={:.0} expected_per_message={} loadgen_cpu_ns_per_delivery={:.0} loadgen_cpu_busy={:.0}%",
        protocol.name(),
        args.connections,
        joined,
        args.groups,
        args.publishers,
        args.payload,
        secs,
        (s1 - s0) as f64 / secs,
        deliveries as f64 / secs,
        args.connections / args.groups,
        cpu_ns_per_delivery,
        100.0 * (c1 - c0).as_secs_f64() / secs,
    );
    (report, joined == args.connections && deliveries > 0)
}
