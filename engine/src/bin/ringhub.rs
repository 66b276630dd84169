//! `ringhub serve`: one ringhub node.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringhub_engine::{ServeArgs, ServerBuilder};
use tracing_subscriber::EnvFilter;

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

/// `RUST_LOG` (default `info`). The Redis driver logs every failed reconnect attempt
/// (twice a second while Redis is down) as a warning; the backplane says what matters
/// about Redis itself, at most once per 10 s, so the driver's own lines are errors only
/// unless `RUST_LOG` names it (`RUST_LOG=info,fred=debug`).
fn log_filter() -> EnvFilter {
    let given = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    let filter = EnvFilter::try_new(if given.is_empty() { "info" } else { &given })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if given.contains("fred") {
        return filter;
    }
    match "fred=error".parse() {
        Ok(quiet_driver) => filter.add_directive(quiet_driver),
        Err(_) => filter,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Command::Serve(args) = Cli::parse().command;
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringhub: {e}");
            return ExitCode::from(2);
        }
    };
    if config.jwt_secret.is_none() {
        tracing::warn!(
            "anonymous mode: no --jwt-secret, so any client may join and send to any group or \
             connection, and there are no users; set --jwt-secret for anything but a trial"
        );
    }
    let listen = config.listen;
    let threads = config.threads;
    let node = config.node_name.clone();
    let server = match ServerBuilder::new(config).start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringhub: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(address = %server.local_addr(), threads, requested = %listen, node, "ringhub listening");
    if let Some(admin) = server.admin_addr() {
        tracing::info!(address = %admin, "metrics and the REST document served on the admin address");
    }
    if let Err(e) = server.run_until_signal() {
        eprintln!("ringhub: cannot watch signals: {e}");
        return ExitCode::from(1);
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
