//! `ringhub-bench`: fan-out benchmarks for real-time servers over loopback.
//!
//! - `loadgen`: fan-out load against a running server (SignalR JSON/MessagePack or
//!   Socket.IO): deliveries per second, loss/duplication/reordering, latency, and the
//!   load generator's own CPU per delivery;
//! - `churn`: JoinGroup/LeaveGroup operations per second;
//! - `idle`: opens and holds idle connections (for memory per connection);
//! - `run`: starts each server under test pinned to its own core, runs the named
//!   workloads, and writes `bench/results/<date>/` (raw JSON lines, a Markdown table,
//!   SVG plots).

mod churn;
mod loadgen;
mod plot;
mod run;

use clap::{Parser, Subcommand};

use ringhub_bench::client::Wire;
use ringhub_bench::http_receiver::ReceiverTransport;

#[derive(Parser)]
#[command(
    name = "ringhub-bench",
    about = "Fan-out benchmarks for real-time servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fan-out load against a running server.
    Loadgen(loadgen::LoadArgs),
    /// Membership churn against a running SignalR server.
    Churn(churn::ChurnArgs),
    /// Open and hold idle connections; prints one JSON line once all are open.
    Idle(churn::IdleArgs),
    /// Start the servers under test and run the named workloads against each.
    Run(run::RunArgs),
}

fn runtime() -> ringhub_engine::runtime::Runtime {
    ringhub_engine::runtime::io_uring_runtime(4096).expect("io_uring runtime")
}

fn pin(core: Option<usize>) {
    if let Some(core) = core {
        let _ = monoio::utils::bind_to_cpu_set([core]);
    }
}

fn wire(name: &str) -> Wire {
    Wire::from_name(name).unwrap_or_else(|| {
        eprintln!("ringhub-bench: --protocol: must be json, messagepack or socketio");
        std::process::exit(2);
    })
}

fn json_line(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("reports serialize")
}

fn main() {
    match Cli::parse().command {
        Command::Loadgen(args) => {
            pin(args.core);
            let wire = wire(&args.protocol);
            let Some(receivers) = ReceiverTransport::from_name(&args.receivers) else {
                eprintln!("ringhub-bench: --receivers: must be websockets, sse or longpolling");
                std::process::exit(2);
            };
            let as_json = args.json;
            let report = runtime().block_on(loadgen::run(args, wire, receivers));
            println!(
                "{}",
                if as_json {
                    json_line(&report)
                } else {
                    report.line()
                }
            );
            if !report.is_sound() {
                eprintln!("ringhub-bench: not every connection joined, nothing arrived, or messages were lost, duplicated or reordered");
                std::process::exit(1);
            }
        }
        Command::Churn(args) => {
            pin(args.core);
            let as_json = args.json;
            let report = runtime().block_on(churn::run(args));
            println!(
                "{}",
                if as_json {
                    json_line(&report)
                } else {
                    report.line()
                }
            );
            if report.connected != report.connections || report.ops_per_sec == 0.0 {
                eprintln!("ringhub-bench: not every connection was set up, or nothing completed");
                std::process::exit(1);
            }
        }
        Command::Idle(args) => {
            pin(args.core);
            let wire = wire(&args.protocol);
            let hold = std::time::Duration::from_secs(args.hold_secs);
            runtime().block_on(async move {
                let report = churn::idle(args, wire).await;
                println!("{}", json_line(&report));
                monoio::time::sleep(hold).await;
            });
        }
        Command::Run(args) => std::process::exit(run::main(args)),
    }
}
