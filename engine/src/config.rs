//! Node configuration (contract section 1): every flag of `ringhub serve`, also read
//! from `RINGHUB_<NAME>` environment variables and from an optional TOML file
//! (`--config`). Precedence: command line, then environment, then file, then default.
//! The flags and the file are the `cli` feature's (default); without it an embedder
//! builds a [`Config`] itself.

use std::net::SocketAddr;
#[cfg(feature = "cli")]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "cli")]
use clap::Args;
#[cfg(feature = "cli")]
use serde::Deserialize;
use thiserror::Error;

#[cfg(feature = "cli")]
use crate::upstream::rules::UpstreamRule;

/// A configuration problem; the message names the flag.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A setting's value is refused, wherever it came from (flag, variable or file).
    #[error("--{flag}: {problem}")]
    Invalid {
        /// The flag's name without `--` (`max-message-bytes`), also the file's key.
        flag: &'static str,
        /// What is wrong and, where it helps, what would be right.
        problem: String,
    },
    /// The `--config` file cannot be read or is not valid TOML with known keys.
    #[error("--config {path}: {problem}")]
    File {
        /// The file as given.
        path: PathBuf,
        /// The I/O or TOML error, with its line where TOML gives one.
        problem: String,
    },
}

/// The flags as given on the command line or in the environment (all optional so a
/// config file can fill the gaps).
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of these settings, keys named as the flags (max-message-bytes = 65536).
    #[arg(long, env = "RINGHUB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TCP address for HTTP and WebSocket: an address or host:port (0.0.0.0:5000 to listen
    /// on every interface, localhost:5000) [default: 127.0.0.1:5000].
    #[arg(long, env = "RINGHUB_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Shards, one pinned thread each [default: number of cores].
    #[arg(long, env = "RINGHUB_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// HS256 secret; when set, every connection needs a valid token (claims: `exp`
    /// required, `nbf` checked, `sub` the user id, `groups` the patterns it may join,
    /// `role: "admin"` everything). Without it the node runs in anonymous mode.
    #[arg(long, env = "RINGHUB_JWT_SECRET", value_name = "S")]
    pub jwt_secret: Option<String>,
    /// Bearer key for the REST API under /api (document: GET /api/openapi.json); REST is
    /// disabled without it.
    #[arg(long, env = "RINGHUB_API_KEY", value_name = "K")]
    pub api_key: Option<String>,
    /// Azure SignalR Service access key (give it twice, or comma-separated, during a
    /// rotation): serves Azure's serverless REST API (/api/v1/hubs/..., and
    /// /api/hubs/...?api-version=...) to calls with a JWT signed with it, and the client
    /// endpoint /client/?hub=H to clients with such a token (user id in `nameid`).
    /// The connection string of an Azure app is then
    /// `Endpoint=http://HOST:PORT;AccessKey=KEY;Version=1.0;`.
    #[arg(
        long = "access-key",
        env = "RINGHUB_ACCESS_KEY",
        value_name = "KEY",
        value_delimiter = ','
    )]
    pub access_key: Vec<String>,
    /// Upstream URL template (give it once per upstream; the first that matches takes
    /// an event): `connected` and `disconnected` of each connection and every client
    /// invocation of a method that is not built in are POSTed to it as Azure SignalR
    /// Service does, `{hub}`, `{category}` and `{event}` replaced; an invocation's answer
    /// is its result. Hub, category and event patterns: `[[upstream]]` tables in the
    /// --config file (`url_template`, `hub_pattern`, `category_pattern`,
    /// `event_pattern`).
    #[arg(
        long = "upstream",
        env = "RINGHUB_UPSTREAM",
        value_name = "URL_TEMPLATE"
    )]
    pub upstream: Vec<String>,
    /// Seconds a connection event is sent again while its upstream fails, before it is
    /// dropped (and counted: ringhub_upstream_failures_total) [default: 30].
    #[arg(long, env = "RINGHUB_UPSTREAM_RETRY_SECS", value_name = "N")]
    pub upstream_retry_secs: Option<u64>,
    /// Directory of the embedded store (redb) for durable user→group membership; a
    /// restart with the same directory keeps it [default: ./ringhub-data].
    #[arg(long, env = "RINGHUB_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Redis of the cluster this node joins (redis://, rediss://, redis+unix:// or
    /// host:port); without it the node runs alone.
    #[arg(long, env = "RINGHUB_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// Largest incoming hub message in bytes [default: 32768].
    #[arg(long, env = "RINGHUB_MAX_MESSAGE_BYTES", value_name = "N")]
    pub max_message_bytes: Option<usize>,
    /// Per-connection outbound queue bound in bytes [default: 1048576].
    #[arg(long, env = "RINGHUB_MAX_BUFFERED_BYTES", value_name = "N")]
    pub max_buffered_bytes: Option<usize>,
    /// Server Ping interval in seconds [default: 15].
    #[arg(long, env = "RINGHUB_KEEPALIVE_SECS", value_name = "N")]
    pub keepalive_secs: Option<u64>,
    /// Silence in seconds after which a connection is dropped; longer than
    /// --keepalive-secs (clients ping when they hear the server) [default: 30].
    #[arg(long, env = "RINGHUB_CLIENT_TIMEOUT_SECS", value_name = "N")]
    pub client_timeout_secs: Option<u64>,
    /// Bytes of unacknowledged messages kept per connection for stateful reconnect; a
    /// connection past it cannot be resumed [default: 102400]. Offered whenever a client
    /// asks.
    #[arg(long, env = "RINGHUB_STATEFUL_RECONNECT_BUFFER", value_name = "N")]
    pub stateful_reconnect_buffer: Option<usize>,
    /// Seconds a receiver may hold its publishers alone (everyone else took their
    /// messages) or take nothing while congested, before it is closed as too slow
    /// [default: 2].
    #[arg(long, env = "RINGHUB_SLOW_CONSUMER_SECS", value_name = "N")]
    pub slow_consumer_secs: Option<u64>,
    /// This node's name in logs (and in a cluster) [default: host name and pid].
    #[arg(long, env = "RINGHUB_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Groups one connection may be in at once, durable groups included [default: 1000].
    #[arg(long, env = "RINGHUB_MAX_GROUPS_PER_CONNECTION", value_name = "N")]
    pub max_groups_per_connection: Option<usize>,
    /// Clock skew in seconds allowed when checking a token's `exp` and `nbf` [default: 30].
    #[arg(long, env = "RINGHUB_JWT_LEEWAY_SECS", value_name = "N")]
    pub jwt_leeway_secs: Option<u64>,
    /// Seconds an SSE or long-polling connection may be without its receive request, a
    /// negotiated connection without a transport, and a dropped stateful-reconnect
    /// WebSocket without its resume, before it is disposed and leaves its groups
    /// (ASP.NET Core's DisconnectTimeout) [default: 15].
    #[arg(long, env = "RINGHUB_DISCONNECT_TIMEOUT_SECS", value_name = "N")]
    pub disconnect_timeout_secs: Option<u64>,
    /// Seconds a long poll waits for messages before answering empty [default: 90].
    #[arg(long, env = "RINGHUB_LONG_POLL_TIMEOUT_SECS", value_name = "N")]
    pub long_poll_timeout_secs: Option<u64>,
    /// Seconds a REST send waits for room to queue its message (its recipients are slow)
    /// before it answers 503 [default: 10].
    #[arg(long, env = "RINGHUB_REST_TIMEOUT_SECS", value_name = "N")]
    pub rest_timeout_secs: Option<u64>,
    /// Seconds a client result (a hub asking a connected client for a value) waits for
    /// the client's answer before it fails [default: 30].
    #[arg(long, env = "RINGHUB_CLIENT_RESULT_TIMEOUT_SECS", value_name = "N")]
    pub client_result_timeout_secs: Option<u64>,
    /// Seconds a stop (SIGTERM) may take at most: clients are told to reconnect, spread
    /// over the first seconds, and their last messages flushed [default: 30].
    #[arg(long, env = "RINGHUB_DRAIN_SECS", value_name = "N")]
    pub drain_secs: Option<u64>,
    /// Sessions of every transport together (WebSockets, SSE, long polling); past it a
    /// new one is refused with 503 [default: what the open-file limit allows].
    #[arg(long, env = "RINGHUB_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Origins a browser page may call from, comma-separated (<https://app.example.com>);
    /// `*` allows any origin. With a list, WebSocket upgrades from other origins are
    /// refused (403) [default: *].
    #[arg(long, env = "RINGHUB_CORS_ORIGINS", value_name = "LIST")]
    pub cors_origins: Option<String>,
    /// Serve /metrics and /api/openapi.json on this address instead of --listen (a
    /// port not exposed to clients) [default: on --listen].
    #[arg(long, env = "RINGHUB_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// How shards do I/O: `auto` uses io_uring and falls back to epoll (with a warning)
    /// where io_uring is denied (container seccomp profiles, gVisor,
    /// kernel.io_uring_disabled); `io-uring` refuses to start without it; `epoll` never
    /// uses it [default: auto].
    #[arg(long, env = "RINGHUB_IO_DRIVER", value_name = "DRIVER")]
    pub io_driver: Option<String>,
}

/// The same settings in a TOML file.
#[cfg(feature = "cli")]
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSettings {
    listen: Option<String>,
    threads: Option<usize>,
    jwt_secret: Option<String>,
    api_key: Option<String>,
    access_key: Option<OneOrMany>,
    upstream: Option<Vec<UpstreamTable>>,
    upstream_retry_secs: Option<u64>,
    data: Option<PathBuf>,
    redis: Option<String>,
    max_message_bytes: Option<usize>,
    max_buffered_bytes: Option<usize>,
    keepalive_secs: Option<u64>,
    client_timeout_secs: Option<u64>,
    stateful_reconnect_buffer: Option<usize>,
    disconnect_timeout_secs: Option<u64>,
    long_poll_timeout_secs: Option<u64>,
    jwt_leeway_secs: Option<u64>,
    max_groups_per_connection: Option<usize>,
    slow_consumer_secs: Option<u64>,
    node_name: Option<String>,
    rest_timeout_secs: Option<u64>,
    client_result_timeout_secs: Option<u64>,
    drain_secs: Option<u64>,
    max_connections: Option<usize>,
    cors_origins: Option<String>,
    admin_listen: Option<String>,
    io_driver: Option<String>,
}

/// An `[[upstream]]` table of the file (Azure's upstream settings); patterns default to
/// `*`.
#[cfg(feature = "cli")]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTable {
    #[serde(alias = "url-template")]
    url_template: String,
    #[serde(default = "any_pattern", alias = "hub-pattern")]
    hub_pattern: String,
    #[serde(default = "any_pattern", alias = "category-pattern")]
    category_pattern: String,
    #[serde(default = "any_pattern", alias = "event-pattern")]
    event_pattern: String,
}

#[cfg(feature = "cli")]
fn any_pattern() -> String {
    "*".into()
}

/// A setting the file may give once or as a list (`access-key = "k"` or `["k1", "k2"]`).
#[cfg(feature = "cli")]
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[cfg(feature = "cli")]
impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// A validated configuration.
///
/// `ServeArgs::resolve` (feature `cli`) checks each setting (counts and durations above zero, the
/// pairs below); an embedder that fills one in by hand (start from
/// [`Config::default`]) is trusted, except that [`ServerBuilder::start`] still refuses
/// a `max_message_bytes` over half of `max_buffered_bytes`.
///
/// [`ServerBuilder::start`]: crate::ServerBuilder::start
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect (HTTP, WebSocket, SSE, long polling); port 0 picks a free
    /// one, see [`Server::local_addr`](crate::Server::local_addr). `--listen`, default
    /// `127.0.0.1:5000`.
    pub listen: SocketAddr,
    /// Shards, each a thread pinned to a core with its own listener; connections never
    /// move between them. `--threads`, default the number of cores, at most 256.
    pub threads: usize,
    /// HS256 secret of the access tokens; when set, every connection needs a valid token
    /// and its claims decide the user id and the groups it may join. `None` runs the
    /// node anonymous: anyone connects and, with the default authorizer, any group is
    /// open. `--jwt-secret`, default none.
    pub jwt_secret: Option<String>,
    /// Bearer key of ringhub's own REST API under `/api` (Azure's API goes by
    /// `access_keys` instead); without one that API answers 404, so a node takes no
    /// sends from HTTP callers unless asked to. `--api-key`, default none.
    pub api_key: Option<String>,
    /// Azure SignalR Service access keys, the primary first (contract section 11): they
    /// sign the tokens of Azure's serverless REST API and of the `/client/` endpoint, so
    /// an Azure app runs against this node with only its connection string changed. Two
    /// during a key rotation (the new one and the old one); none leaves the
    /// Azure-compatible API and client endpoint off. `--access-key`, default none.
    pub access_keys: Vec<String>,
    /// Where connection events and invocations of methods that are not built in go,
    /// tried in order (contract section 11); none: nowhere.
    pub upstreams: Vec<crate::upstream::rules::UpstreamRule>,
    /// How long a connection event is sent again while its upstream fails.
    pub upstream_retry: Duration,
    /// Directory of the redb file that keeps durable user→group memberships across
    /// restarts; unused with `redis` (Redis keeps them) or a
    /// [`membership_store`](crate::ServerBuilder::membership_store). `--data`, default
    /// `./ringhub-data`.
    pub data: PathBuf,
    /// The Redis URL (`redis://`, `rediss://`, `redis+unix://`) of the cluster this
    /// node joins: sends reach every node's connections and memberships live in Redis.
    /// `None` runs the node alone. `--redis`, default none.
    pub redis: Option<String>,
    /// Largest hub message a client may send, in bytes; a longer one closes its
    /// connection (1009 on WebSockets). At most half of `max_buffered_bytes`.
    /// `--max-message-bytes`, default 32768.
    pub max_message_bytes: usize,
    /// Bound of each connection's outbound queue, in bytes: the memory a slow client
    /// can cost, and the scale of every flow-control window (see
    /// [`Config::message_limit`]). `--max-buffered-bytes`, default 1048576.
    pub max_buffered_bytes: usize,
    /// How often the server sends a Ping to an otherwise quiet connection, so the
    /// client (and proxies) know it is alive. `--keepalive-secs`, default 15 s.
    pub keepalive: Duration,
    /// Silence after which a client is taken as gone and its connection closed; longer
    /// than `keepalive`, since clients ping only when they hear the server.
    /// `--client-timeout-secs`, default 30 s.
    pub client_timeout: Duration,
    /// Bytes of sent but unacknowledged messages kept per connection for stateful
    /// reconnect (offered whenever a client asks); a connection that goes past it can no
    /// longer resume, only reconnect. `--stateful-reconnect-buffer`, default 102400.
    pub stateful_reconnect_buffer: usize,
    /// How long a connection may be without a transport (an SSE or long-polling session
    /// between requests, a negotiated id not yet connected, a stateful-reconnect
    /// WebSocket waiting for its resume) before it is disposed and leaves its groups.
    /// `--disconnect-timeout-secs`, default 15 s.
    pub disconnect_timeout: Duration,
    /// How long a long poll waits for messages before it answers empty (the client
    /// polls again at once). `--long-poll-timeout-secs`, default 90 s.
    pub long_poll_timeout: Duration,
    /// Clock skew allowed when checking a token's `exp` and `nbf`, so that a token made
    /// on a slightly different clock is not refused. `--jwt-leeway-secs`, default 30 s
    /// (0 allowed).
    pub jwt_leeway: Duration,
    /// Groups one connection may be in (durable groups count) or watch at once; a join
    /// past it fails, so one client cannot grow the routing tables without bound.
    /// `--max-groups-per-connection`, default 1000.
    pub max_groups_per_connection: usize,
    /// How long a receiver may hold its publishers alone (everyone else took their
    /// messages) or take nothing while congested, before it is closed as too slow: one
    /// slow client slows a broadcast for at most this long. `--slow-consumer-secs`,
    /// default 2 s.
    pub slow_consumer: Duration,
    /// This node's name in logs and in the cluster's view of its nodes (names may
    /// repeat: the cluster adds a random suffix). `--node-name`, default the host
    /// name and the process id.
    pub node_name: String,
    /// How long a REST send waits for room to queue its message (its recipients are
    /// slow) before it answers `503`. `--rest-timeout-secs`, default 10 s.
    pub rest_timeout: Duration,
    /// How long [`HubContext::invoke_client`](crate::HubContext::invoke_client) waits for
    /// the client's answer before it fails. `--client-result-timeout-secs`, default
    /// 30 s (ASP.NET Core's).
    pub client_result_timeout: Duration,
    /// How long a stop (SIGTERM, `Server::shutdown`) may take at most: clients are
    /// told to reconnect, spread over its first seconds so that they do not all come
    /// back at once, and their last messages flushed. `--drain-secs`, default 30 s.
    pub drain: Duration,
    /// Sessions of every transport together on this node; past it a new one is refused
    /// with `503`. The bound that keeps SSE and long-polling sessions, which hold no
    /// socket between requests, from growing without limit. `--max-connections`,
    /// default what the open-file limit allows (see [`open_file_limit`]).
    pub max_connections: usize,
    /// Origins browser pages may call from (CORS, and WebSocket upgrades from other
    /// origins refused with `403`). `--cors-origins`, default [`CorsOrigins::Any`].
    pub cors_origins: CorsOrigins,
    /// Where `/metrics` and `/api/openapi.json` are served instead of `listen`, to keep
    /// them on a port clients cannot reach. `--admin-listen`, default none (on
    /// `listen`).
    pub admin_listen: Option<SocketAddr>,
    /// How shards do I/O: io_uring, epoll, or io_uring with epoll as the fallback.
    /// `--io-driver`, default [`IoDriverChoice::Auto`].
    pub io_driver: IoDriverChoice,
}

/// How shards do I/O (`--io-driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoDriverChoice {
    /// io_uring where the kernel allows it, epoll otherwise.
    #[default]
    Auto,
    /// io_uring or nothing: the server does not start without it.
    IoUring,
    /// epoll (monoio's legacy driver), even where io_uring works.
    Epoll,
}

/// Which browser origins may call a node (`--cors-origins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Any origin: each is reflected (access is by token, never by cookie).
    Any,
    /// Only these (`scheme://host[:port]`, lower case).
    Only(Vec<String>),
}

impl Config {
    /// Whether a page from `origin` may call this node.
    pub fn allows_origin(&self, origin: &str) -> bool {
        match &self.cors_origins {
            CorsOrigins::Any => true,
            CorsOrigins::Only(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            threads: default_threads(),
            jwt_secret: None,
            api_key: None,
            access_keys: Vec::new(),
            upstreams: Vec::new(),
            upstream_retry: Duration::from_secs(30),
            data: PathBuf::from("./ringhub-data"),
            redis: None,
            max_message_bytes: 32 * 1024,
            max_buffered_bytes: 1 << 20,
            keepalive: Duration::from_secs(15),
            client_timeout: Duration::from_secs(30),
            stateful_reconnect_buffer: 102_400,
            disconnect_timeout: Duration::from_secs(15),
            long_poll_timeout: Duration::from_secs(90),
            jwt_leeway: Duration::from_secs(30),
            max_groups_per_connection: 1000,
            slow_consumer: Duration::from_secs(2),
            node_name: default_node_name(),
            rest_timeout: Duration::from_secs(10),
            client_result_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(30),
            max_connections: default_max_connections(),
            cors_origins: CorsOrigins::Any,
            admin_listen: None,
            io_driver: IoDriverChoice::Auto,
        }
    }
}

/// Flow control (contract section 6, `flow`): what sends may have on their way, derived
/// from `--max-buffered-bytes` so that one setting scales them all.
impl Config {
    /// The largest message a send takes once encoded: half the queue bound, so one
    /// message always fits in a queue that takes frames up to half its bound.
    pub fn message_limit(&self) -> usize {
        self.max_buffered_bytes / 2
    }

    /// What one connection's sends may have on their way (a quarter of the queue bound:
    /// enough to keep the other shards busy, small beside every receiver's queue).
    pub fn connection_publish_window(&self) -> usize {
        self.max_buffered_bytes / 4
    }

    /// What all connections of one shard may have on their way together.
    pub fn shard_publish_budget(&self) -> usize {
        self.max_buffered_bytes.saturating_mul(16)
    }

    /// What sends through a `HubContext` (REST, embedders) may have on their way together.
    pub fn context_publish_budget(&self) -> usize {
        self.max_buffered_bytes.saturating_mul(16)
    }

    /// What bytes POSTed before sessions' first receive requests may take together
    /// (each session's at most `--max-message-bytes`: a handshake fits).
    pub fn early_input_budget(&self) -> usize {
        self.max_buffered_bytes.saturating_mul(16)
    }
}

#[cfg(feature = "cli")]
/// A Redis address as the contract takes it (`redis://`, `rediss://`, `redis+unix://`
/// or `host:port`), as a URL the Redis client reads.
fn redis_url(given: &str) -> Result<String, String> {
    let url = if given.contains("://") {
        given.to_owned()
    } else {
        format!("redis://{given}")
    };
    let scheme = url.split("://").next().unwrap_or_default();
    if !matches!(scheme, "redis" | "rediss" | "redis+unix") {
        return Err(format!(
            "'{given}' is not a redis://, rediss://, redis+unix:// URL or host:port"
        ));
    }
    fred::types::config::Config::from_url(&url)
        .map_err(|e| format!("'{given}' is not a Redis address: {}", e.details()))?;
    Ok(url)
}

/// The host name and the process id.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "ringhub".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The process's open-file limit (1024 when it cannot be read).
pub fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(1024)
}

/// Sessions a node takes by default: what the open-file limit leaves beside the
/// connections in the HTTP phase (half of it, see `shard::state`) and a margin for the
/// listeners, the store and Redis. SSE and long-polling sessions hold no descriptor
/// between requests, so without this bound they would not be bounded at all.
fn default_max_connections() -> usize {
    let limit = open_file_limit();
    (limit / 2).saturating_sub(64).max(64)
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(feature = "cli")]
fn invalid(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        problem: problem.into(),
    }
}

#[cfg(feature = "cli")]
fn positive<T: PartialOrd + Default + Copy>(
    flag: &'static str,
    value: T,
) -> Result<T, ConfigError> {
    if value > T::default() {
        Ok(value)
    } else {
        Err(invalid(flag, "must be greater than 0"))
    }
}

#[cfg(feature = "cli")]
impl ServeArgs {
    /// Merges the file (if any) under these arguments and validates the result.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let defaults = Config::default();
        let listen_text = self.listen.or(file.listen);
        let listen = match listen_text {
            Some(text) => listen_address(&text)?,
            None => defaults.listen,
        };
        let threads = match self.threads.or(file.threads) {
            Some(n) => {
                let n = positive("threads", n)?;
                if n > 256 {
                    return Err(invalid("threads", "at most 256 shards"));
                }
                n
            }
            None => defaults.threads,
        };
        let non_empty = |flag: &'static str, value: Option<String>| match value {
            Some(v) if v.is_empty() => Err(invalid(flag, "must not be empty")),
            other => Ok(other),
        };
        let jwt_secret = non_empty("jwt-secret", self.jwt_secret.or(file.jwt_secret))?;
        let api_key = non_empty("api-key", self.api_key.or(file.api_key))?;
        let access_keys = if self.access_key.is_empty() {
            file.access_key.map(OneOrMany::into_vec).unwrap_or_default()
        } else {
            self.access_key
        };
        if access_keys.iter().any(|key| key.trim().is_empty()) {
            return Err(invalid("access-key", "must not be empty"));
        }
        if access_keys.len() > 2 {
            return Err(invalid(
                "access-key",
                "at most two keys (the new one and the old one during a rotation)",
            ));
        }
        let upstreams: Vec<UpstreamRule> = if self.upstream.is_empty() {
            file.upstream
                .unwrap_or_default()
                .into_iter()
                .map(|table| UpstreamRule {
                    url_template: table.url_template,
                    hub_pattern: table.hub_pattern,
                    category_pattern: table.category_pattern,
                    event_pattern: table.event_pattern,
                })
                .collect()
        } else {
            self.upstream.into_iter().map(UpstreamRule::any).collect()
        };
        if let Some(problem) = upstreams.iter().find_map(UpstreamRule::problem) {
            return Err(invalid("upstream", problem));
        }
        let redis = non_empty("redis", self.redis.or(file.redis))?;
        let redis = redis
            .map(|url| redis_url(&url).map_err(|why| invalid("redis", why)))
            .transpose()?;
        let data = self.data.or(file.data).unwrap_or(defaults.data);
        if data.as_os_str().is_empty() {
            return Err(invalid("data", "must not be empty"));
        }
        // A positive count, or seconds, given as a flag or in the file; else the default.
        let count =
            |flag, value: Option<usize>, default| value.map_or(Ok(default), |n| positive(flag, n));
        let secs = |flag, value: Option<u64>, default| {
            value.map_or(Ok(default), |n| positive(flag, n).map(Duration::from_secs))
        };
        let max_message_bytes = count(
            "max-message-bytes",
            self.max_message_bytes.or(file.max_message_bytes),
            defaults.max_message_bytes,
        )?;
        let max_buffered_bytes = count(
            "max-buffered-bytes",
            self.max_buffered_bytes.or(file.max_buffered_bytes),
            defaults.max_buffered_bytes,
        )?;
        let keepalive = secs(
            "keepalive-secs",
            self.keepalive_secs.or(file.keepalive_secs),
            defaults.keepalive,
        )?;
        let client_timeout = secs(
            "client-timeout-secs",
            self.client_timeout_secs.or(file.client_timeout_secs),
            defaults.client_timeout,
        )?;
        // One message must fit in a receiver's queue with room to spare, or a single
        // send could close every healthy receiver (contract section 6).
        if max_message_bytes > max_buffered_bytes / 2 {
            return Err(invalid(
                "max-message-bytes",
                format!(
                    "{max_message_bytes} is more than half of --max-buffered-bytes ({max_buffered_bytes})"
                ),
            ));
        }
        if client_timeout <= keepalive {
            return Err(invalid(
                "client-timeout-secs",
                format!(
                    "must be longer than --keepalive-secs ({}s), or idle clients are dropped",
                    keepalive.as_secs()
                ),
            ));
        }
        let stateful_reconnect_buffer = self
            .stateful_reconnect_buffer
            .or(file.stateful_reconnect_buffer)
            .unwrap_or(defaults.stateful_reconnect_buffer);
        let disconnect_timeout = secs(
            "disconnect-timeout-secs",
            self.disconnect_timeout_secs
                .or(file.disconnect_timeout_secs),
            defaults.disconnect_timeout,
        )?;
        let long_poll_timeout = secs(
            "long-poll-timeout-secs",
            self.long_poll_timeout_secs.or(file.long_poll_timeout_secs),
            defaults.long_poll_timeout,
        )?;
        let upstream_retry = secs(
            "upstream-retry-secs",
            self.upstream_retry_secs.or(file.upstream_retry_secs),
            defaults.upstream_retry,
        )?;
        let jwt_leeway = self
            .jwt_leeway_secs
            .or(file.jwt_leeway_secs)
            .map_or(defaults.jwt_leeway, Duration::from_secs);
        let max_groups_per_connection = count(
            "max-groups-per-connection",
            self.max_groups_per_connection
                .or(file.max_groups_per_connection),
            defaults.max_groups_per_connection,
        )?;
        let slow_consumer = secs(
            "slow-consumer-secs",
            self.slow_consumer_secs.or(file.slow_consumer_secs),
            defaults.slow_consumer,
        )?;
        let rest_timeout = secs(
            "rest-timeout-secs",
            self.rest_timeout_secs.or(file.rest_timeout_secs),
            defaults.rest_timeout,
        )?;
        let client_result_timeout = secs(
            "client-result-timeout-secs",
            self.client_result_timeout_secs
                .or(file.client_result_timeout_secs),
            defaults.client_result_timeout,
        )?;
        let drain = secs(
            "drain-secs",
            self.drain_secs.or(file.drain_secs),
            defaults.drain,
        )?;
        let max_connections = count(
            "max-connections",
            self.max_connections.or(file.max_connections),
            defaults.max_connections,
        )?;
        let cors_origins = match self.cors_origins.or(file.cors_origins) {
            None => CorsOrigins::Any,
            Some(list) => cors_origins(&list)?,
        };
        let admin_listen = self
            .admin_listen
            .or(file.admin_listen)
            .map(|text| {
                listen_address(&text).map_err(|_| {
                    invalid(
                        "admin-listen",
                        format!("'{text}' is not an address or host:port"),
                    )
                })
            })
            .transpose()?;
        if admin_listen.is_some_and(|admin| admin == listen && admin.port() != 0) {
            return Err(invalid("admin-listen", "must differ from --listen"));
        }
        let io_driver = match self.io_driver.or(file.io_driver).as_deref() {
            None | Some("auto") => IoDriverChoice::Auto,
            Some("io-uring") => IoDriverChoice::IoUring,
            Some("epoll") => IoDriverChoice::Epoll,
            Some(other) => {
                return Err(invalid(
                    "io-driver",
                    format!("'{other}': must be auto, io-uring or epoll"),
                ))
            }
        };
        let node_name = match self.node_name.or(file.node_name) {
            Some(name) if name.trim().is_empty() => {
                return Err(invalid("node-name", "must not be empty"))
            }
            Some(name) => name,
            None => defaults.node_name,
        };
        Ok(Config {
            listen,
            threads,
            jwt_secret,
            api_key,
            access_keys,
            upstreams,
            upstream_retry,
            data,
            redis,
            max_message_bytes,
            max_buffered_bytes,
            keepalive,
            client_timeout,
            stateful_reconnect_buffer,
            disconnect_timeout,
            long_poll_timeout,
            jwt_leeway,
            max_groups_per_connection,
            slow_consumer,
            node_name,
            rest_timeout,
            client_result_timeout,
            drain,
            max_connections,
            cors_origins,
            admin_listen,
            io_driver,
        })
    }
}

/// `--cors-origins`: `*`, or origins (`scheme://host[:port]`) separated by commas.
#[cfg(feature = "cli")]
fn cors_origins(list: &str) -> Result<CorsOrigins, ConfigError> {
    if list.trim() == "*" {
        return Ok(CorsOrigins::Any);
    }
    let mut origins = Vec::new();
    for origin in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let valid = origin.split_once("://").is_some_and(|(scheme, host)| {
            matches!(scheme, "http" | "https") && !host.is_empty() && !host.contains('/')
        });
        if !valid {
            return Err(invalid(
                "cors-origins",
                format!("'{origin}' is not an origin like https://app.example.com (no path)"),
            ));
        }
        origins.push(origin.to_ascii_lowercase());
    }
    if origins.is_empty() {
        return Err(invalid("cors-origins", "names no origin (use * for any)"));
    }
    Ok(CorsOrigins::Only(origins))
}

/// `--listen`: an address (`0.0.0.0:5000`, `[::]:5000`) or a host name and a port
/// (`localhost:5000`), resolved once at startup (its first address, IPv4 first).
#[cfg(feature = "cli")]
fn listen_address(text: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let not_an_address = || {
        invalid(
            "listen",
            format!(
                "'{text}' is not an address or host:port like 127.0.0.1:5000 or localhost:5000"
            ),
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(not_an_address)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(not_an_address());
    }
    let mut addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| invalid("listen", format!("cannot resolve '{host}': {e}")))?
        .collect();
    addrs.sort_by_key(|addr| addr.is_ipv6());
    addrs.into_iter().next().ok_or_else(not_an_address)
}

#[cfg(feature = "cli")]
fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let problem = |p: String| ConfigError::File {
        path: path.to_owned(),
        problem: p,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    toml::from_str(&text).map_err(|e| problem(e.message().to_owned()))
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.max_message_bytes, 32768);
        assert_eq!(c.max_buffered_bytes, 1_048_576);
        assert_eq!(c.keepalive, Duration::from_secs(15));
        assert_eq!(c.client_timeout, Duration::from_secs(30));
        assert_eq!(c.stateful_reconnect_buffer, 102_400);
        assert_eq!(c.slow_consumer, Duration::from_secs(2));
        assert_eq!(c.max_groups_per_connection, 1000);
        assert_eq!(c.jwt_leeway, Duration::from_secs(30));
        assert_eq!(c.rest_timeout, Duration::from_secs(10));
        assert_eq!(c.client_result_timeout, Duration::from_secs(30));
        assert_eq!(c.drain, Duration::from_secs(30));
        assert!(c.max_connections >= 64);
        assert!(c.node_name.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn errors_name_the_flag() {
        let bad = |args: ServeArgs| args.resolve().unwrap_err().to_string();
        assert!(bad(ServeArgs {
            listen: Some("nowhere".into()),
            ..Default::default()
        })
        .starts_with("--listen:"));
        assert!(bad(ServeArgs {
            threads: Some(0),
            ..Default::default()
        })
        .starts_with("--threads:"));
        assert!(bad(ServeArgs {
            redis: Some("http://x".into()),
            ..Default::default()
        })
        .starts_with("--redis:"));
        assert!(bad(ServeArgs {
            keepalive_secs: Some(40),
            ..Default::default()
        })
        .starts_with("--client-timeout-secs:"));
        let too_big = bad(ServeArgs {
            max_message_bytes: Some(600_000),
            ..Default::default()
        });
        assert!(
            too_big.starts_with("--max-message-bytes:") && too_big.contains("--max-buffered-bytes"),
            "{too_big}"
        );
        assert!(ServeArgs {
            max_message_bytes: Some(524_288),
            ..Default::default()
        }
        .resolve()
        .is_ok());
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        let listen = |text: &str| {
            ServeArgs {
                listen: Some(text.into()),
                ..Default::default()
            }
            .resolve()
            .map(|c| c.listen.to_string())
            .map_err(|e| e.to_string())
        };
        assert_eq!(listen("0.0.0.0:5000").unwrap(), "0.0.0.0:5000");
        assert_eq!(listen("[::1]:5001").unwrap(), "[::1]:5001");
        assert_eq!(listen("localhost:5002").unwrap(), "127.0.0.1:5002");
        for bad in [
            "localhost",
            "localhost:http",
            ":5000",
            "no such host.invalid:1",
        ] {
            assert!(listen(bad).unwrap_err().starts_with("--listen:"), "{bad}");
        }
    }

    #[test]
    fn cors_origins_are_any_or_a_list_of_origins() {
        let resolve = |list: &str| {
            ServeArgs {
                cors_origins: Some(list.into()),
                ..Default::default()
            }
            .resolve()
        };
        let config = resolve("https://App.example.com, http://localhost:8080").unwrap();
        assert!(config.allows_origin("https://app.example.com"));
        assert!(config.allows_origin("http://localhost:8080"));
        assert!(!config.allows_origin("https://evil.example.com"));
        assert!(resolve("*").unwrap().allows_origin("https://anything"));
        for bad in [
            "app.example.com",
            "https://a.example.com/path",
            ",",
            "ftp://x",
        ] {
            let error = resolve(bad).unwrap_err().to_string();
            assert!(error.starts_with("--cors-origins:"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_file_fills_what_flags_leave_out() {
        let dir = std::env::temp_dir().join(format!("ringhub-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringhub.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\nthreads = 3\nmax-message-bytes = 100\n",
        )
        .unwrap();
        let c = ServeArgs {
            config: Some(path.clone()),
            threads: Some(1),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.threads, 1);
        assert_eq!(c.max_message_bytes, 100);
        std::fs::write(&path, "listne = 1\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().starts_with("--config"), "{err}");
    }

    #[test]
    fn every_redis_address_form_of_the_contract_is_taken() {
        let redis = |given: &str| {
            ServeArgs {
                redis: Some(given.into()),
                ..Default::default()
            }
            .resolve()
            .map(|c| c.redis.unwrap_or_default())
            .map_err(|e| e.to_string())
        };
        assert_eq!(redis("10.0.0.5:6380").unwrap(), "redis://10.0.0.5:6380");
        assert_eq!(redis("redis://h:1/2").unwrap(), "redis://h:1/2");
        assert_eq!(redis("rediss://h:6379").unwrap(), "rediss://h:6379");
        assert_eq!(
            redis("redis+unix:///run/redis.sock").unwrap(),
            "redis+unix:///run/redis.sock"
        );
        for bad in ["http://h:1", "redis://h:notaport", ""] {
            let error = redis(bad).unwrap_err();
            assert!(error.starts_with("--redis:"), "{bad}: {error}");
        }
    }

    #[test]
    fn access_keys_come_from_flags_or_the_file_and_are_checked() {
        let keys = |args: ServeArgs| args.resolve().map(|c| c.access_keys);
        assert!(keys(ServeArgs::default()).unwrap().is_empty());
        assert_eq!(
            keys(ServeArgs {
                access_key: vec!["new".into(), "old".into()],
                ..Default::default()
            })
            .unwrap(),
            ["new", "old"]
        );
        let dir = std::env::temp_dir().join(format!("ringhub-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringhub.toml");
        let from_file = |text: &str| {
            std::fs::write(&path, text).unwrap();
            keys(ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        assert_eq!(from_file("access-key = \"k\"\n").unwrap(), ["k"]);
        assert_eq!(
            from_file("access-key = [\"k1\", \"k2\"]\n").unwrap(),
            ["k1", "k2"]
        );
        for bad in [
            vec!["".to_owned()],
            vec!["a".into(), "b".into(), "c".into()],
        ] {
            let error = keys(ServeArgs {
                access_key: bad,
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(error.starts_with("--access-key:"), "{error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn upstreams_come_from_flags_or_tables_of_the_file_in_order() {
        let upstreams = |args: ServeArgs| args.resolve().map(|c| c.upstreams);
        assert!(upstreams(ServeArgs::default()).unwrap().is_empty());
        assert_eq!(
            upstreams(ServeArgs {
                upstream: vec!["http://a/{event}".into(), "https://b/{hub}".into()],
                ..Default::default()
            })
            .unwrap(),
            [
                UpstreamRule::any("http://a/{event}"),
                UpstreamRule::any("https://b/{hub}")
            ]
        );
        let dir = std::env::temp_dir().join(format!("ringhub-upstreams-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringhub.toml");
        let from_file = |text: &str| {
            std::fs::write(&path, text).unwrap();
            upstreams(ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            })
        };
        let rules = from_file(
            "[[upstream]]\nurl_template = \"http://a/{event}\"\nhub_pattern = \"chat\"\n\
             event_pattern = \"connected, disconnected\"\n\n\
             [[upstream]]\nurl-template = \"http://b/{category}\"\ncategory-pattern = \"messages\"\n",
        )
        .unwrap();
        assert_eq!(
            rules,
            [
                UpstreamRule {
                    url_template: "http://a/{event}".into(),
                    hub_pattern: "chat".into(),
                    category_pattern: "*".into(),
                    event_pattern: "connected, disconnected".into(),
                },
                UpstreamRule {
                    url_template: "http://b/{category}".into(),
                    hub_pattern: "*".into(),
                    category_pattern: "messages".into(),
                    event_pattern: "*".into(),
                }
            ]
        );
        assert!(
            from_file("[[upstream]]\nhub_pattern = \"x\"\n").is_err(),
            "no url"
        );
        assert!(from_file("[[upstream]]\nurl_template = \"http://a\"\nother = 1\n").is_err());
        let error = upstreams(ServeArgs {
            upstream: vec!["not a url {event}".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("--upstream:"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
