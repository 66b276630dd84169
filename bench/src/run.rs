//! `ringhub-bench run`: starts each server under test pinned to its own core
//! (`taskset`), runs the load generator pinned to another, one workload at a time, and
//! writes `bench/results/<date>/`: `results.jsonl` (one JSON object per measurement),
//! `README.md` (the tables) and SVG plots. Every process it starts is stopped when it
//! ends, also on failure.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use crate::loadgen::cpu_ticks;
use crate::plot;

#[derive(Parser, Clone, Debug)]
pub struct RunArgs {
    /// Comma-separated workloads, or `all`: fanout-1k, fanout-10k, broadcast-big,
    /// slow-reader, latency, idle-100k, churn, cluster (fanout-1k's shape with the
    /// members spread over two nodes sharing a redis-server and the publishers on the
    /// first; single-node servers run it with every member on their one node),
    /// cluster-latency (the same at latency's fixed 2,000 sends/s).
    #[arg(long, default_value = "all")]
    pub workloads: String,
    /// Comma-separated servers, or `all`: ringhub, ceiling, socketioxide, naive,
    /// ringhub-2t (two shards, load generator sharing both cores), ringhub-sse and
    /// ringhub-lp (ringhub with receivers over Server-Sent Events or long polling;
    /// fanout-1k only), ringhub-stateful (receivers with stateful reconnect, acking
    /// once a second; fanout-1k only). Not in `all`: ringhub-sysalloc (the `ringhub`
    /// binary built with the system allocator, `--no-default-features --features cli`,
    /// and copied to `ringhub-sysalloc` beside it), ringhub-base (any other `ringhub`
    /// binary copied to `ringhub-base` beside it: an earlier commit, for A/B runs),
    /// ringhub-epoll (`ringhub` on epoll, `--io-driver epoll`: what a node pays where
    /// io_uring is denied), ringhub-cluster and
    /// socketioxide-cluster (two nodes and a redis-server; the cluster workload only:
    /// both nodes pinned to the server core, Redis to the load generator's).
    #[arg(long, default_value = "all")]
    pub servers: String,
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    #[arg(long, default_value_t = 8)]
    pub duration_secs: u64,
    /// Multiplies every connection count (a smoke run uses a small fraction).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Where to write the results [default: bench-results/<UTC date>, under the current
    /// directory; the repository's own bench/results holds the runs the README quotes].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The core the server runs on; the load generator gets the next one.
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// Rounds of every throughput, latency and churn measurement, the servers taking
    /// turns within a round; the tables show each server's median run and the range.
    /// (idle-100k is measured once: memory does not vary like throughput.)
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

const WORKLOADS: [&str; 9] = [
    "fanout-1k",
    "fanout-10k",
    "broadcast-big",
    "slow-reader",
    "latency",
    "idle-100k",
    "churn",
    "cluster",
    "cluster-latency",
];
const SERVERS: [&str; 10] = [
    "ringhub",
    "ceiling",
    "socketioxide",
    "naive",
    "ringhub-2t",
    "ringhub-sse",
    "ringhub-lp",
    "ringhub-stateful",
    "ringhub-cluster",
    "socketioxide-cluster",
];
/// Servers run only when named (they need a binary built apart).
const NAMED_ONLY_SERVERS: [&str; 3] = ["ringhub-sysalloc", "ringhub-base", "ringhub-epoll"];

/// A server under test.
struct Server {
    name: &'static str,
    /// `json` (SignalR) or `socketio`.
    protocol: &'static str,
    /// Both cores, unpinned (the scaling comparison).
    two_shards: bool,
    /// The receivers' transport (the load generator's `--receivers`).
    receivers: &'static str,
    /// Receivers use stateful reconnect (the load generator's `--stateful`).
    stateful: bool,
    /// Two nodes sharing a redis-server.
    cluster: bool,
}

impl Server {
    fn of(name: &str) -> Option<Server> {
        let (protocol, two_shards, receivers) = match name {
            "ringhub" | "ceiling" | "naive" | "ringhub-stateful" | "ringhub-sysalloc"
            | "ringhub-base" | "ringhub-epoll" | "ringhub-cluster" => ("json", false, "websockets"),
            "ringhub-2t" => ("json", true, "websockets"),
            "ringhub-sse" => ("json", false, "sse"),
            "ringhub-lp" => ("json", false, "longpolling"),
            "socketioxide" | "socketioxide-cluster" => ("socketio", false, "websockets"),
            _ => return None,
        };
        let name = SERVERS
            .into_iter()
            .chain(NAMED_ONLY_SERVERS)
            .find(|s| *s == name)?;
        Some(Server {
            name,
            protocol,
            two_shards,
            receivers,
            stateful: name == "ringhub-stateful",
            cluster: name.ends_with("-cluster"),
        })
    }

    /// The command that starts the server (a cluster's node when `redis` is given).
    fn command(
        &self,
        bin: &Path,
        addr: SocketAddr,
        data: &Path,
        redis: Option<&str>,
    ) -> Vec<String> {
        let addr = addr.to_string();
        let mut argv = match self.name {
            "ringhub" | "ringhub-2t" | "ringhub-sse" | "ringhub-lp" | "ringhub-stateful"
            | "ringhub-sysalloc" | "ringhub-base" | "ringhub-epoll" | "ringhub-cluster" => vec![
                bin.join(match self.name {
                    "ringhub-sysalloc" | "ringhub-base" => self.name,
                    _ => "ringhub",
                })
                .display()
                .to_string(),
                "serve".into(),
                "--listen".into(),
                addr,
                "--threads".into(),
                if self.two_shards { "2" } else { "1" }.into(),
                "--data".into(),
                data.display().to_string(),
            ],
            "ceiling" => vec![bin.join("ceiling-peer").display().to_string(), addr],
            "naive" => vec![bin.join("naive-peer").display().to_string(), addr],
            _ => vec![bin.join("socketio-peer").display().to_string(), addr],
        };
        if self.name == "ringhub-epoll" {
            argv.extend(["--io-driver".to_owned(), "epoll".to_owned()]);
        }
        if let Some(redis) = redis {
            if self.protocol == "socketio" {
                argv.push(redis.to_owned());
            } else {
                argv.extend(["--redis".to_owned(), redis.to_owned()]);
            }
        }
        argv
    }

    /// Whether the server can run a workload (churn needs JoinGroup/LeaveGroup with
    /// real membership, which only ringhub implements among the peers; the SSE and
    /// long-polling receivers are measured on fanout-1k).
    fn runs(&self, workload: &str) -> bool {
        let cluster_workload = workload.starts_with("cluster");
        if self.cluster || cluster_workload {
            return cluster_workload
                && (self.cluster || matches!(self.name, "ringhub" | "socketioxide"));
        }
        if self.receivers != "websockets" || self.stateful {
            return workload == "fanout-1k";
        }
        if workload == "slow-reader" {
            // Two shards add nothing to the question (is the stalled one closed, is
            // anyone else hurt), and its receivers need WebSockets.
            return !self.two_shards;
        }
        workload != "churn" || self.name.starts_with("ringhub")
    }
}

/// Kills its process (and waits) when dropped, so nothing is left behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // The child is not reaped before `wait` below, so its pid cannot be reused meanwhile.
        terminate(self.0.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn pinned(core: Option<usize>, argv: &[String]) -> Command {
    let mut command = match core {
        Some(core) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &core.to_string()]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    command.stdin(Stdio::null());
    command
}

/// Whether the server listens; false at once if it exited (its port was taken).
fn wait_for_port(addr: SocketAddr, server: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = server.try_wait() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Resident memory of a process in bytes (VmRSS).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The most connections one load generator and one server process can hold here: each
/// needs a descriptor per connection, and both are capped by RLIMIT_NOFILE.
fn connection_cap() -> usize {
    // "Max open files            20000                20000                files"
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024);
    soft.saturating_sub(200).min(100_000)
}

struct Context {
    args: RunArgs,
    bin: PathBuf,
    out: PathBuf,
    port: u16,
    results: Vec<Value>,
}

impl Context {
    fn scaled(&self, connections: usize) -> usize {
        scale_connections(connections, self.args.scale)
    }

    /// Starts the server on the next free port (a port the load generator's own
    /// connections hold makes the server exit at once; then the next one is tried).
    /// Starts `argv(addr, data dir)` on the next free port (a port the load generator's
    /// own connections hold makes the process exit at once; then the next one is tried).
    fn start_listening(
        &mut self,
        what: &str,
        core: Option<usize>,
        argv: impl Fn(SocketAddr, &Path) -> Vec<String>,
    ) -> Result<(Guard, SocketAddr), String> {
        for _ in 0..10 {
            self.port += 1;
            let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
            let data = std::env::temp_dir().join(format!("ringhub-bench-data-{}", self.port));
            let argv = argv(addr, &data);
            let child = pinned(core, &argv)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
            let mut guard = Guard(child);
            if wait_for_port(addr, &mut guard.0) {
                return Ok((guard, addr));
            }
        }
        Err(format!("{what} did not listen on any of 10 ports"))
    }

    fn start(&mut self, server: &Server) -> Result<(Guard, SocketAddr), String> {
        let core = (!server.two_shards).then_some(self.args.server_core);
        let bin = self.bin.clone();
        self.start_listening(server.name, core, |addr, data| {
            server.command(&bin, addr, data, None)
        })
    }

    /// Starts a redis-server (pinned with the load generator) and two nodes of `server`
    /// sharing it (both pinned to the server core). Returns the processes (nodes first,
    /// so that they stop before Redis does) and the nodes' addresses.
    fn start_cluster(&mut self, server: &Server) -> Result<(Vec<Guard>, [SocketAddr; 2]), String> {
        let (redis, redis_addr) = self.start_listening(
            "redis-server",
            Some(self.args.server_core + 1),
            |addr, _| {
                let port = addr.port().to_string();
                [
                    "redis-server",
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            },
        )?;
        let url = format!("redis://{redis_addr}");
        let bin = self.bin.clone();
        let core = Some(self.args.server_core);
        let node = |addr: SocketAddr, data: &Path| server.command(&bin, addr, data, Some(&url));
        let (first, first_addr) = self.start_listening(server.name, core, node)?;
        let (second, second_addr) = self.start_listening(server.name, core, node)?;
        // The nodes find each other through Redis (ringhub: a heartbeat a second).
        std::thread::sleep(Duration::from_millis(1500));
        Ok((vec![first, second, redis], [first_addr, second_addr]))
    }

    fn loadgen_core(&self, server: &Server) -> Option<usize> {
        (!server.two_shards).then_some(self.args.server_core + 1)
    }

    /// Runs `ringhub-bench <args>` and returns its last stdout line as JSON. When the
    /// load generator announces its measuring window, the server's CPU time over that
    /// window is added to the report (`server_cpu_busy`, `server_cpu_ns_per_delivery`).
    fn bench(
        &self,
        server: &Server,
        server_pids: &[u32],
        args: &[String],
    ) -> Result<Value, String> {
        let server_ticks = || -> u64 { server_pids.iter().map(|pid| cpu_ticks(Some(*pid))).sum() };
        let mut argv = vec![std::env::current_exe()
            .map_err(|e| e.to_string())?
            .display()
            .to_string()];
        argv.extend(args.iter().cloned());
        let mut child = pinned(self.loadgen_core(server), &argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run the load generator: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut window = (None, None);
        let mut last = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|e| e.to_string())?;
            if line.contains("\"event\":\"measuring\"") {
                window.0 = Some((server_ticks(), Instant::now()));
            } else if line.contains("\"event\":\"measured\"") {
                window.1 = Some((server_ticks(), Instant::now()));
            } else if !line.trim().is_empty() {
                last = line;
            }
        }
        let _ = child.wait();
        let mut report: Value = serde_json::from_str(&last)
            .map_err(|_| format!("no report from the load generator: {last}"))?;
        if let (Some((cpu0, t0)), Some((cpu1, t1))) = window {
            let cpu_secs = cpu1.saturating_sub(cpu0) as f64 / 100.0;
            let wall = (t1 - t0).as_secs_f64();
            let deliveries = report["deliveries_per_sec"].as_f64().unwrap_or(0.0)
                * report["secs"].as_f64().unwrap_or(0.0);
            report["server_cpu_busy"] = json!(100.0 * cpu_secs / wall);
            if deliveries > 0.0 {
                report["server_cpu_ns_per_delivery"] = json!(cpu_secs * 1e9 / deliveries);
            }
        }
        Ok(report)
    }

    fn fanout(&mut self, workload: &str, server: &Server) -> Result<Value, String> {
        // broadcast-big and slow-reader: open-loop publishers, as fast as the server
        // takes their sends with 64 in flight each (faster than any fan-out of 4 KiB to
        // 1,000: the server has to slow them down).
        let (groups, publishers, payload, window, rate) = match workload {
            "fanout-1k" | "cluster" => (10, 4, 64, 16, None),
            "fanout-10k" => (100, 4, 64, 16, None),
            "broadcast-big" | "slow-reader" => (1, 4, 4096, 64, None),
            // latency and cluster-latency
            _ => (10, 4, 64, 16, Some(2000)),
        };
        let connections = self.scaled(connections_of(workload));
        let groups = groups.min(connections);
        let (processes, addr, receiver_addrs) = if server.cluster {
            let (processes, [first, second]) = self.start_cluster(server)?;
            (
                processes,
                first,
                Some(format!("--receiver-addrs={first},{second}")),
            )
        } else {
            let (process, addr) = self.start(server)?;
            (vec![process], addr, None)
        };
        let server_pids: Vec<u32> = processes
            .iter()
            .take(if server.cluster { 2 } else { 1 })
            .map(|p| p.0.id())
            .collect();
        let mut args: Vec<String> = vec![
            "loadgen".into(),
            "--json".into(),
            format!("--addr={addr}"),
            format!("--protocol={}", server.protocol),
            format!("--receivers={}", server.receivers),
            format!("--connections={connections}"),
            format!("--groups={groups}"),
            format!("--publishers={publishers}"),
            format!("--payload={payload}"),
            format!("--window={window}"),
            format!("--warmup-secs={}", self.args.warmup_secs),
            format!("--duration-secs={}", self.args.duration_secs),
        ];
        if let Some(rate) = rate {
            args.push(format!("--rate={rate}"));
        }
        if workload == "slow-reader" {
            args.push("--stall-one".into());
        }
        if server.stateful {
            args.push("--stateful".into());
        }
        args.extend(receiver_addrs);
        self.bench(server, &server_pids, &args)
    }

    fn churn(&mut self, server: &Server) -> Result<Value, String> {
        let (server_process, addr) = self.start(server)?;
        self.bench(
            server,
            &[server_process.0.id()],
            &[
                "churn".into(),
                "--json".into(),
                format!("--addr={addr}"),
                format!("--connections={}", self.scaled(200)),
                "--groups=50".into(),
                format!("--warmup-secs={}", self.args.warmup_secs.min(1)),
                format!("--duration-secs={}", self.args.duration_secs),
            ],
        )
    }

    /// Memory per idle connection at several counts, up to what the machine allows.
    fn idle(&mut self, server: &Server) -> Result<Value, String> {
        let cap = connection_cap();
        let top = self.scaled(100_000).min(cap);
        let mut counts: Vec<usize> = [1000, 5000, 10_000]
            .into_iter()
            .map(|c| self.scaled(c))
            .filter(|c| *c < top)
            .collect();
        counts.push(top);
        let mut points = Vec::new();
        for count in counts {
            let (server_process, addr) = self.start(server)?;
            std::thread::sleep(Duration::from_millis(300));
            let before = rss_bytes(server_process.0.id());
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let argv = vec![
                exe.display().to_string(),
                "idle".into(),
                format!("--addr={addr}"),
                format!("--protocol={}", server.protocol),
                format!("--connections={count}"),
            ];
            let mut child = pinned(self.loadgen_core(server), &argv)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let _loadgen = Guard(child);
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let report: Value =
                serde_json::from_str(&line).map_err(|_| format!("no idle report: {line}"))?;
            // Let the server settle (tasks parked, buffers allocated), then measure.
            std::thread::sleep(Duration::from_millis(1500));
            let after = rss_bytes(server_process.0.id());
            let connected = report["connected"].as_u64().unwrap_or(0);
            points.push(json!({
                "connections": count,
                "connected": connected,
                "connect_secs": report["connect_secs"],
                "rss_before": before,
                "rss_after": after,
                "bytes_per_connection": after.saturating_sub(before).checked_div(connected).unwrap_or(0),
            }));
        }
        Ok(json!({ "points": points, "connection_cap": cap }))
    }

    fn measure(&mut self, workload: &str, server: &Server, round: usize) {
        eprintln!("-- {workload} / {} (round {})", server.name, round + 1);
        let started = Instant::now();
        let result = match workload {
            "idle-100k" => self.idle(server),
            "churn" => self.churn(server),
            _ => self.fanout(workload, server),
        };
        let record = match result {
            Ok(report) => {
                json!({ "workload": workload, "server": server.name, "round": round, "report": report })
            }
            Err(error) => {
                eprintln!("   failed: {error}");
                json!({ "workload": workload, "server": server.name, "round": round, "error": error })
            }
        };
        eprintln!(
            "   {} ({:.0} s)",
            summary(&record),
            started.elapsed().as_secs_f64()
        );
        self.results.push(record);
    }
}

fn summary(record: &Value) -> String {
    let report = &record["report"];
    if let Some(d) = report["deliveries_per_sec"].as_f64() {
        format!(
            "{} deliveries/s, lost {}, dup {}, reordered {}, closed {}, p99 {} µs, server busy {:.0} %, load generator busy {:.0} %",
            plot::human(d),
            report["lost"],
            report["duplicated"],
            report["reordered"],
            report["disconnected"],
            report["latency_us_p99"],
            report["server_cpu_busy"].as_f64().unwrap_or(0.0),
            report["loadgen_cpu_busy"].as_f64().unwrap_or(0.0)
        )
    } else if let Some(ops) = report["ops_per_sec"].as_f64() {
        format!("{} ops/s", plot::human(ops))
    } else if let Some(points) = report["points"].as_array() {
        points
            .iter()
            .map(|p| format!("{}: {} B/conn", p["connections"], p["bytes_per_connection"]))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        record["error"].to_string()
    }
}

/// The items of a comma-separated list (`all`: every one of `all`), each from `all` or
/// `named_only`.
fn pick<'a>(
    list: &'a str,
    all: &[&'a str],
    named_only: &[&'a str],
) -> Result<Vec<&'a str>, String> {
    if list == "all" {
        return Ok(all.to_vec());
    }
    list.split(',')
        .map(|item| {
            all.iter()
                .chain(named_only)
                .find(|known| **known == item)
                .copied()
                .ok_or_else(|| format!("unknown `{item}` (known: {})", all.join(", ")))
        })
        .collect()
}

fn utc_date() -> String {
    let output = Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    output
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "undated".into())
}

pub fn main(args: RunArgs) -> i32 {
    let (workload_list, server_list) = (args.workloads.clone(), args.servers.clone());
    let (workloads, servers) = match (
        pick(&workload_list, &WORKLOADS, &[]),
        pick(&server_list, &SERVERS, &NAMED_ONLY_SERVERS),
    ) {
        (Ok(w), Ok(s)) => (w, s),
        (Err(e), _) => {
            eprintln!("ringhub-bench run: --workloads: {e}");
            return 2;
        }
        (_, Err(e)) => {
            eprintln!("ringhub-bench run: --servers: {e}");
            return 2;
        }
    };
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(utc_date()));
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("ringhub-bench run: cannot create {}: {e}", out.display());
        return 1;
    }
    let started = Instant::now();
    let mut context = Context {
        args,
        bin,
        out,
        // Below the usual ephemeral range (32768-60999), where the load generator's own
        // connections take their ports.
        port: 20000 + (std::process::id() % 400) as u16 * 25,
        results: Vec::new(),
    };
    for workload in &workloads {
        let rounds = if *workload == "idle-100k" {
            1
        } else {
            context.args.repeat.max(1)
        };
        for round in 0..rounds {
            for name in &servers {
                let server = Server::of(name).expect("known server");
                if server.runs(workload) {
                    context.measure(workload, &server, round);
                }
            }
        }
    }
    let elapsed = started.elapsed();
    match write_results(&context, &workloads, &servers, elapsed) {
        Ok(()) => {
            eprintln!(
                "ringhub-bench run: {} measurements in {:.0} s, written to {}",
                context.results.len(),
                elapsed.as_secs_f64(),
                context.out.display()
            );
            if context.results.iter().any(|r| r.get("error").is_some()) {
                1
            } else {
                0
            }
        }
        Err(e) => {
            eprintln!("ringhub-bench run: cannot write the results: {e}");
            1
        }
    }
}

/// What a workload's runs are ranked by to pick the median one.
fn rank_key(workload: &str) -> &'static str {
    match workload {
        "latency" | "cluster-latency" => "latency_us_p99",
        "churn" => "ops_per_sec",
        _ => "deliveries_per_sec",
    }
}

/// Every successful report of one server in one workload.
fn reports<'a>(results: &'a [Value], workload: &str, server: &str) -> Vec<&'a Value> {
    results
        .iter()
        .filter(|r| r["workload"] == workload && r["server"] == server)
        .map(|r| &r["report"])
        .filter(|r| !r.is_null())
        .collect()
}

/// The server's median run of the workload (the only one without `--repeat`).
fn find<'a>(results: &'a [Value], workload: &str, server: &str) -> Option<&'a Value> {
    let key = rank_key(workload);
    let mut runs = reports(results, workload, server);
    runs.sort_by(|a, b| {
        let (a, b) = (
            a[key].as_f64().unwrap_or(0.0),
            b[key].as_f64().unwrap_or(0.0),
        );
        a.total_cmp(&b)
    });
    runs.get(runs.len().saturating_sub(1) / 2).copied()
}

/// The sum over all runs: a loss in any run shows, not only in the median one.
fn total(results: &[Value], workload: &str, server: &str, key: &str) -> u64 {
    reports(results, workload, server)
        .iter()
        .filter_map(|r| r[key].as_u64())
        .sum()
}

/// `value`, followed by the range over all runs when there were several.
fn with_range(results: &[Value], workload: &str, server: &str, key: &str, value: f64) -> String {
    let values: Vec<f64> = reports(results, workload, server)
        .iter()
        .filter_map(|r| r[key].as_f64())
        .collect();
    let shown = |v: f64| {
        if key.starts_with("latency") {
            format!("{v:.0}")
        } else {
            plot::human(v)
        }
    };
    if values.len() < 2 {
        return shown(value);
    }
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}-{})", shown(value), shown(low), shown(high))
}

/// A workload's p50, p99 and p99.9 per server, as bar groups.
/// The connections a workload opens at scale 1.
fn connections_of(workload: &str) -> usize {
    match workload {
        "fanout-10k" => 10_000,
        "idle-100k" => 100_000,
        _ => 1000,
    }
}

/// A workload's name as headings and plots show it: with the scale and the connections
/// actually opened when the run was scaled (`fanout-1k` at `--scale 0.2` opened 200).
fn heading(workload: &str, scale: f64) -> String {
    if scale == 1.0 {
        return workload.to_owned();
    }
    format!(
        "{workload} at scale {scale} ({} connections)",
        opened(workload, scale)
    )
}

/// The connections a workload opens at `scale`.
fn opened(workload: &str, scale: f64) -> usize {
    scale_connections(connections_of(workload), scale)
}

/// A connection count at `scale` (at least 10: a group of one says nothing).
fn scale_connections(connections: usize, scale: f64) -> usize {
    ((connections as f64 * scale).round() as usize).max(10)
}

/// Below this share of a core busy, neither side of a throughput run was its
/// bottleneck: the figure is what was offered, not what the server can do.
const SATURATED_PERCENT: f64 = 90.0;

fn latency_groups(results: &[Value], workload: &str, servers: &[&str]) -> Vec<plot::BarGroup> {
    [
        ("p50", "latency_us_p50"),
        ("p99", "latency_us_p99"),
        ("p99.9", "latency_us_p999"),
    ]
    .iter()
    .map(|(label, key)| plot::BarGroup {
        label: label.to_string(),
        values: servers
            .iter()
            .map(|s| find(results, workload, s).and_then(|r| r[*key].as_f64()))
            .collect(),
    })
    .collect()
}

fn write_results(
    context: &Context,
    workloads: &[&str],
    servers: &[&str],
    elapsed: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let out = &context.out;
    let results = &context.results;
    let mut lines = String::new();
    for r in results {
        writeln!(lines, "{r}")?;
    }
    std::fs::write(out.join("results.jsonl"), lines)?;

    let args = &context.args;
    let mut md = String::new();
    writeln!(md, "# ringhub-bench run, {}\n", utc_date())?;
    writeln!(
        md,
        "`ringhub-bench run --workloads {} --servers {} --warmup-secs {} --duration-secs {} --scale {} --repeat {}` \
         took {:.0} s on {} cores. Servers pinned to core {}, the load generator to core {} \
         (`ringhub-2t`: two shards, nothing pinned). Each row is the server's median run; \
         with several rounds, the range over them follows in parentheses and the loss columns add up all rounds. Raw data: `results.jsonl`.\n",
        args.workloads,
        args.servers,
        args.warmup_secs,
        args.duration_secs,
        args.scale,
        args.repeat,
        elapsed.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.server_core,
        args.server_core + 1,
    )?;
    for workload in workloads {
        match *workload {
            "idle-100k" => {
                writeln!(md, "## {}\n", heading(workload, args.scale))?;
                writeln!(md, "| server | connections | connect time | RSS per connection |\n|---|---|---|---|")?;
                for server in servers {
                    let Some(report) = find(results, workload, server) else {
                        continue;
                    };
                    for p in report["points"].as_array().into_iter().flatten() {
                        writeln!(
                            md,
                            "| {server} | {} of {} | {:.2} s | {} B |",
                            p["connected"],
                            p["connections"],
                            p["connect_secs"].as_f64().unwrap_or(0.0),
                            p["bytes_per_connection"]
                        )?;
                    }
                }
                writeln!(md)?;
            }
            "slow-reader" => {
                writeln!(md, "## {}\n", heading(workload, args.scale))?;
                writeln!(
                    md,
                    "1,000 members of one group, 4 publishers sending 4 KiB messages with 64 in flight each; \
                     one member stops reading when the measurement starts. Losses and closes count the \
                     999 others.\n"
                )?;
                writeln!(
                    md,
                    "| server | deliveries/s | lost | reordered | others closed | stalled one closed after | longest publisher stall |\n|---|---|---|---|---|---|---|"
                )?;
                for server in servers {
                    let Some(report) = find(results, workload, server) else {
                        continue;
                    };
                    let deliveries = report["deliveries_per_sec"].as_f64().unwrap_or(0.0);
                    let closed_after = report["stalled_closed_after_secs"]
                        .as_f64()
                        .map_or("not closed".to_owned(), |s| format!("{s:.1} s"));
                    writeln!(
                        md,
                        "| {server} | {} | {} | {} | {} | {closed_after} | {:.0} ms |",
                        with_range(results, workload, server, "deliveries_per_sec", deliveries),
                        total(results, workload, server, "lost"),
                        total(results, workload, server, "reordered"),
                        total(results, workload, server, "disconnected"),
                        report["publisher_stall_ms_max"].as_f64().unwrap_or(0.0),
                    )?;
                }
                writeln!(md)?;
            }
            "churn" => {
                writeln!(
                    md,
                    "## {}\n\n| server | join/leave ops/s | load generator busy |\n|---|---|---|",
                    heading(workload, args.scale)
                )?;
                for server in servers {
                    let Some(report) = find(results, workload, server) else {
                        continue;
                    };
                    let ops = report["ops_per_sec"].as_f64().unwrap_or(0.0);
                    writeln!(
                        md,
                        "| {server} | {} | {:.0} % |",
                        with_range(results, workload, server, "ops_per_sec", ops),
                        report["loadgen_cpu_busy"].as_f64().unwrap_or(0.0)
                    )?;
                }
                writeln!(md)?;
            }
            _ => {
                let ceiling = find(results, workload, "ceiling")
                    .and_then(|r| r["deliveries_per_sec"].as_f64());
                writeln!(md, "## {}\n", heading(workload, args.scale))?;
                writeln!(
                    md,
                    "| server | deliveries/s | vs ceiling | lost | duplicated | reordered | receivers closed | p50 µs | p99 µs | p99.9 µs | server busy | server CPU per delivery | load generator busy |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
                )?;
                // Paced workloads offer a fixed load: nobody is meant to be saturated.
                let paced = workload.ends_with("latency");
                let mut unsaturated = Vec::new();
                for server in servers {
                    let Some(report) = find(results, workload, server) else {
                        if let Some(error) = results
                            .iter()
                            .find(|r| r["workload"] == *workload && r["server"] == *server)
                            .and_then(|r| r["error"].as_str())
                        {
                            writeln!(md, "| {server} | failed: {error} | | | | | | | | | | | |")?;
                        }
                        continue;
                    };
                    let deliveries = report["deliveries_per_sec"].as_f64().unwrap_or(0.0);
                    let busy = |key: &str| report[key].as_f64().unwrap_or(0.0);
                    let (server_busy, loadgen_busy) =
                        (busy("server_cpu_busy"), busy("loadgen_cpu_busy"));
                    if !paced && server_busy < SATURATED_PERCENT && loadgen_busy < SATURATED_PERCENT
                    {
                        unsaturated.push(format!(
                            "{server} (server {server_busy:.0} %, load generator {loadgen_busy:.0} %)"
                        ));
                    }
                    let ratio = ceiling
                        .filter(|c| *c > 0.0)
                        .map_or("-".to_owned(), |c| format!("{:.2}x", deliveries / c));
                    writeln!(
                        md,
                        "| {server} | {} | {ratio} | {} | {} | {} | {} | {} | {} | {} | {:.0} % | {:.2} µs | {:.0} % |",
                        with_range(results, workload, server, "deliveries_per_sec", deliveries),
                        total(results, workload, server, "lost"),
                        total(results, workload, server, "duplicated"),
                        total(results, workload, server, "reordered"),
                        total(results, workload, server, "disconnected"),
                        report["latency_us_p50"],
                        with_range(
                            results,
                            workload,
                            server,
                            "latency_us_p99",
                            report["latency_us_p99"].as_f64().unwrap_or(0.0)
                        ),
                        report["latency_us_p999"],
                        report["server_cpu_busy"].as_f64().unwrap_or(0.0),
                        report["server_cpu_ns_per_delivery"].as_f64().unwrap_or(0.0) / 1000.0,
                        report["loadgen_cpu_busy"].as_f64().unwrap_or(0.0)
                    )?;
                }
                if !unsaturated.is_empty() {
                    writeln!(
                        md,
                        "\nNot saturated (neither side {SATURATED_PERCENT:.0} % busy): {}. Their deliveries/s is what was offered, not what the server can do.",
                        unsaturated.join(", ")
                    )?;
                }
                writeln!(md)?;
            }
        }
    }
    let mut plots: Vec<&str> = Vec::new();

    let series: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
    // A bar plot in the results directory, listed in the README.
    let bars = |plots: &mut Vec<&'static str>,
                name: &'static str,
                title: &str,
                unit: &str,
                groups: &[plot::BarGroup]|
     -> Result<(), Box<dyn std::error::Error>> {
        plots.push(name);
        plot::bars(&out.join(name), title, unit, &series, groups)
    };
    // One group per fan-out workload run, of one measured key.
    let fanout_groups = |key: &str| -> Vec<plot::BarGroup> {
        workloads
            .iter()
            .filter(|w| matches!(**w, "fanout-1k" | "fanout-10k" | "broadcast-big"))
            .map(|w| plot::BarGroup {
                label: heading(w, args.scale),
                values: servers
                    .iter()
                    .map(|s| find(results, w, s).and_then(|r| r[key].as_f64()))
                    .collect(),
            })
            .collect()
    };
    let fanouts = fanout_groups("deliveries_per_sec");
    if !fanouts.is_empty() {
        bars(
            &mut plots,
            "deliveries.svg",
            "Fan-out: deliveries per second",
            "deliveries/s",
            &fanouts,
        )?;
        bars(
            &mut plots,
            "fanout-p99.svg",
            "Fan-out at full load: p99 latency",
            "µs",
            &fanout_groups("latency_us_p99"),
        )?;
    }
    if workloads.contains(&"latency") {
        let groups = latency_groups(results, "latency", servers);
        bars(
            &mut plots,
            "latency.svg",
            &format!(
                "Latency at 2,000 sends/s ({} connections)",
                opened("latency", args.scale)
            ),
            "µs",
            &groups,
        )?;
    }
    if workloads.contains(&"cluster") {
        let groups = vec![plot::BarGroup {
            label: format!("{} over 2 nodes", heading("cluster", args.scale)),
            values: servers
                .iter()
                .map(|s| find(results, "cluster", s).and_then(|r| r["deliveries_per_sec"].as_f64()))
                .collect(),
        }];
        bars(
            &mut plots,
            "cluster.svg",
            "Scale-out over Redis: deliveries per second",
            "deliveries/s",
            &groups,
        )?;
    }
    if workloads.contains(&"cluster-latency") {
        let groups = latency_groups(results, "cluster-latency", servers);
        bars(
            &mut plots,
            "cluster-latency.svg",
            &format!(
                "Latency at 2,000 sends/s, {} members over 2 nodes",
                opened("cluster-latency", args.scale)
            ),
            "µs",
            &groups,
        )?;
    }
    if workloads.contains(&"idle-100k") {
        let lines: Vec<(String, Vec<(f64, f64)>)> = servers
            .iter()
            .filter_map(|s| {
                let points = find(results, "idle-100k", s)?["points"].as_array()?;
                let xy = points
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p["connected"].as_f64()?,
                            p["bytes_per_connection"].as_f64()?,
                        ))
                    })
                    .collect();
                Some((s.to_string(), xy))
            })
            .collect();
        plots.push("memory.svg");
        plot::lines(
            &out.join("memory.svg"),
            "Resident memory per idle connection",
            "connections",
            "bytes per connection",
            &lines,
        )?;
    }
    if !plots.is_empty() {
        let names: Vec<String> = plots.iter().map(|p| format!("`{p}`")).collect();
        writeln!(md, "Plots: {}.", names.join(", "))?;
    }
    std::fs::write(out.join("README.md"), md)?;
    Ok(())
}
