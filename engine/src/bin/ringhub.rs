//! `ringhub serve`: one ringhub node.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringhub_engine::ServeArgs;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ringhub",
    version,
    about = "A SignalR-compatible real-time hub server on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start one node.
    #[command(after_help = SERVE_NOTES)]
    Serve(ServeArgs),
}

/// What `ringhub serve --help` says below the flags.
const SERVE_NOTES: &str = "\
Every flag is also read from the environment (RINGHUB_<NAME>: RINGHUB_LISTEN, \
RINGHUB_JWT_SECRET, ...) and from the TOML file given with --config (keys named as the \
flags: max-message-bytes = 65536). A flag wins over the environment, which wins over \
the file, which wins over the default.

Logs go to stderr; RUST_LOG filters them (default: info; RUST_LOG=debug for every \
connection, RUST_LOG=info,fred=debug for the Redis driver's own lines).

Endpoints: /hubs/{hub} (SignalR: negotiate, WebSockets, Server-Sent Events, long \
polling), /api/... (REST, with --api-key; the document at /api/openapi.json), /healthz \
(liveness), /readyz (readiness), /metrics (Prometheus).";

fn main() -> ExitCode {
    ringhub_engine::cli::init_logging();
    let Command::Serve(args) = Cli::parse().command;
    ringhub_engine::cli::serve("ringhub", args, |builder| builder, |_| {})
}
