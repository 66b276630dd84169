//! What a program that serves as `ringhub serve` does needs (the `cli` feature): its
//! logs, its flags resolved, the server started and logged, then run until SIGINT or
//! SIGTERM. The `ringhub` binary and the examples that take its flags use it, so they
//! start, log and stop alike (the end-to-end tests read the `address=` line).

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::{ServeArgs, Server, ServerBuilder};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). The Redis driver logs every
/// failed reconnect attempt (twice a second while Redis is down) as a warning; the
/// backplane says what matters about Redis itself, at most once per 10 s, so the
/// driver's own lines are errors only unless `RUST_LOG` names it
/// (`RUST_LOG=info,fred=debug`).
pub fn init_logging() {
    let given = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    let mut filter = EnvFilter::try_new(if given.is_empty() { "info" } else { &given })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if !given.contains("fred") {
        if let Ok(quiet_driver) = "fred=error".parse() {
            filter = filter.add_directive(quiet_driver);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves `args`, builds the server (`build` adds the program's hubs and providers),
/// starts it, hands it to `started` (a backend thread takes its context there), and
/// runs it until a signal. Errors are said on stderr under `program`'s name: exit 2 for
/// flags, 1 for a server that cannot start.
pub fn serve(
    program: &str,
    args: ServeArgs,
    build: impl FnOnce(ServerBuilder) -> ServerBuilder,
    started: impl FnOnce(&Server),
) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    if config.jwt_secret.is_none() {
        tracing::warn!(
            "anonymous mode: no --jwt-secret, so any client may join and send to any group or \
             connection, and there are no users; set --jwt-secret for anything but a trial"
        );
    }
    let (listen, threads, node) = (config.listen, config.threads, config.node_name.clone());
    let server = match build(ServerBuilder::new(config)).start() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(address = %server.local_addr(), threads, requested = %listen, node, "{program} listening");
    if let Some(admin) = server.admin_addr() {
        tracing::info!(address = %admin, "metrics and the REST document served on the admin address");
    }
    started(&server);
    if let Err(e) = server.run_until_signal() {
        eprintln!("{program}: cannot watch signals: {e}");
        return ExitCode::from(1);
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
