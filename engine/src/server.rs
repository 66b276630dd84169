//! Building, starting and stopping a node: one pinned io_uring thread per shard (epoll
//! where io_uring is denied), each with its own `SO_REUSEPORT` listener on the same
//! address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;

use crate::admin::AdminServer;
use crate::api::hub::HubFactories;
use crate::api::types::HubRoutes;
use crate::api::{Hub, HubContext};
use crate::auth::{ClaimPatterns, GroupAuthorizer, SubClaimUserId, UserIdProvider};
use crate::backplane::{Link, Outgoing, RedisStore};
use crate::config::{Config, IoDriverChoice};
use crate::metrics::Metrics;
use crate::node::{Node, StoreJob};
use crate::runtime::IoDriver;
use crate::shard::inbox::Command;
use crate::store::{MembershipStore, RedbStore, StoreError};

/// Why a server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A shard's listener could not be bound to `--listen` (permissions, an address
    /// that is not this host's...).
    #[error("--listen {addr}: cannot listen: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The bind's error.
        source: std::io::Error,
    },
    /// Another process already listens there; told apart from [`ServerError::Listen`]
    /// because it is the usual mistake and has the usual fix.
    #[error("--listen {addr}: the address is in use (another ringhub, or another server, listens there)")]
    AddressInUse {
        /// The configured address.
        addr: SocketAddr,
    },
    /// A shard or helper thread could not be spawned (thread or memory limits).
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// A [`Config`] built by hand whose `max_message_bytes` exceeds half of
    /// `max_buffered_bytes`: one message could then fill a receiver's queue alone
    /// (contract section 6).
    #[error(
        "--max-message-bytes: {message} is more than half of --max-buffered-bytes ({buffered})"
    )]
    MessageOverHalfTheQueue {
        /// `max_message_bytes`.
        message: usize,
        /// `max_buffered_bytes`.
        buffered: usize,
    },
    /// The default membership store (redb under `--data`) could not be opened.
    #[error("--data: {0}")]
    Store(#[from] StoreError),
    /// `--io-driver io-uring` where the kernel or sandbox denies io_uring; `auto`
    /// would have fallen back to epoll.
    #[error("--io-driver io-uring: io_uring is not available ({source}); {IO_URING_FIX}")]
    IoUringDenied {
        /// The error of setting up a test ring.
        source: std::io::Error,
    },
    /// The `--admin-listen` listener could not be bound.
    #[error("--admin-listen {addr}: cannot listen: {source}")]
    AdminListen {
        /// The configured admin address.
        addr: SocketAddr,
        /// The bind's error.
        source: std::io::Error,
    },
}

/// Configures a server.
pub struct ServerBuilder {
    config: Config,
    hubs: HubFactories,
    /// Whether `hubs.any` is the built-in hub the builder started with (mapping a name
    /// replaces it).
    builtin_for_any: bool,
    hub_paths: Vec<(String, String)>,
    user_ids: Arc<dyn UserIdProvider>,
    authorizer: Arc<dyn GroupAuthorizer>,
    store: Option<Arc<dyn MembershipStore>>,
}

impl ServerBuilder {
    /// A server running the contract's built-in hub.
    pub fn new(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            hubs: HubFactories {
                named: Vec::new(),
                any: Some(Arc::new(|| Box::new(crate::builtin::BuiltinHub))),
            },
            builtin_for_any: true,
            hub_paths: Vec::new(),
            user_ids: Arc::new(SubClaimUserId),
            authorizer: Arc::new(ClaimPatterns),
            store: None,
        }
    }

    /// Runs your own hub under every hub name (one instance per shard, made by
    /// `factory`), as `ringhub serve` runs the built-in one; names mapped with
    /// [`ServerBuilder::map_hub`] go to their own hubs.
    pub fn hub<H: Hub>(mut self, factory: impl Fn() -> H + Send + Sync + 'static) -> Self {
        self.hubs.any = Some(Arc::new(move || Box::new(factory())));
        self.builtin_for_any = false;
        self
    }

    /// Serves hub `name` (clients connect to `/hubs/{name}`) with your hub. Once a name
    /// is mapped, a name no hub is mapped to is `404` (unless [`ServerBuilder::hub`]
    /// serves every other name).
    pub fn map_hub<H: Hub>(
        mut self,
        name: &str,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self {
        if self.builtin_for_any {
            self.hubs.any = None;
            self.builtin_for_any = false;
        }
        self.hubs.named.retain(|(n, _)| n != name);
        self.hubs
            .named
            .push((name.to_owned(), Arc::new(move || Box::new(factory()))));
        self
    }

    /// Serves hub `name` also at `path` (`"/chatHub"`, as ASP.NET Core's
    /// `MapHub<ChatHub>("/chatHub")`), so that existing clients keep their URLs:
    /// negotiate at `{path}/negotiate`, the transports at `{path}`. `HubContext` sends
    /// name the hub by `name`.
    pub fn map_hub_at<H: Hub>(
        mut self,
        path: &str,
        name: &str,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self {
        let path = format!("/{}", path.trim_matches('/'));
        self.hub_paths.retain(|(p, _)| *p != path);
        self.hub_paths.push((path, name.to_owned()));
        self.map_hub(name, factory)
    }

    /// Where connections' user ids come from, instead of the token's `sub` claim: for
    /// user targeting and durable groups keyed by your own ids.
    pub fn user_id_provider(mut self, provider: impl UserIdProvider) -> Self {
        self.user_ids = Arc::new(provider);
        self
    }

    /// Who may join which group, instead of the token's `groups` patterns and admin
    /// role: what [`HubContext::may_join`] answers (the built-in hub's `JoinGroup` asks
    /// it), and what a resumed connection's groups are checked against again.
    pub fn group_authorizer(mut self, authorizer: impl GroupAuthorizer) -> Self {
        self.authorizer = Arc::new(authorizer);
        self
    }

    /// Where durable user -> group memberships live; without this, a redb file under
    /// the configured data directory.
    pub fn membership_store(mut self, store: impl MembershipStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Binds the listeners and starts the shards.
    pub fn start(self) -> Result<Server, ServerError> {
        let (message, buffered) = (
            self.config.max_message_bytes,
            self.config.max_buffered_bytes,
        );
        if message > buffered / 2 {
            return Err(ServerError::MessageOverHalfTheQueue { message, buffered });
        }
        let io_driver = choose_io_driver(self.config.io_driver)?;
        let threads = self.config.threads;
        // With `--redis`, a backplane thread links this node to the cluster; its id is
        // the node's name and a random suffix (names are for people and may repeat).
        let backplane = self.config.redis.is_some().then(|| {
            let node_id = format!(
                "{}/{}",
                self.config.node_name,
                crate::transport::random_id()
            );
            Link::new(node_id)
        });
        let durable_in_redis = self.store.is_none() && backplane.is_some();
        let store: Arc<dyn MembershipStore> = match (self.store, &backplane) {
            (Some(store), _) => store,
            (None, Some((link, _))) => Arc::new(RedisStore { link: link.clone() }),
            (None, None) => Arc::new(RedbStore::open(&self.config.data)?),
        };
        let (store_jobs, jobs) = std::sync::mpsc::channel::<StoreJob>();
        let store_for_thread = store.clone();
        std::thread::Builder::new()
            .name("ringhub-store".into())
            .spawn(move || {
                // Ends when the last sender (the server's shared state) is gone.
                for job in jobs {
                    job(&*store_for_thread);
                }
            })
            .map_err(ServerError::Thread)?;
        let listeners = bind_listeners(self.config.listen, threads)?;
        let local_addr = listeners[0]
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: self.config.listen,
                source,
            })?;
        let (link, link_end) = backplane.unzip();
        let mut node = Node::new(
            self.config,
            self.user_ids,
            self.authorizer,
            store,
            store_jobs,
            link,
        );
        node.durable_in_redis = durable_in_redis;
        node.hub_routes = HubRoutes {
            names: self
                .hubs
                .any
                .is_none()
                .then(|| self.hubs.named.iter().map(|(n, _)| n.clone()).collect()),
            paths: self.hub_paths.clone(),
        };
        node.io_driver = io_driver;
        node.upstream = crate::upstream::Upstream::start(
            node.config.upstreams.clone(),
            node.config.access_keys.clone(),
            node.config.upstream_retry,
            node.config.message_limit(),
            node.metrics.clone(),
        )
        .map_err(ServerError::Thread)?;
        node.metrics
            .io_uring
            .store((io_driver == IoDriver::IoUring).into(), Ordering::Relaxed);
        let node = Arc::new(node);
        let admin = match node.config.admin_listen {
            Some(addr) => Some(
                AdminServer::start(addr, node.clone())
                    .map_err(|source| ServerError::AdminListen { addr, source })?,
            ),
            None => None,
        };
        if let (Some(end), Some(url)) = (link_end, &node.config.redis) {
            crate::cluster::start(node.clone(), url, end).map_err(ServerError::Thread)?;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut handles = Vec::with_capacity(threads);
        for (index, listener) in listeners.into_iter().enumerate() {
            let node = node.clone();
            let hubs = self.hubs.clone();
            let handle = std::thread::Builder::new()
                .name(format!("ringhub-shard-{index}"))
                .spawn(move || crate::shard::run::run(index, index % cores, listener, node, hubs))
                .map_err(ServerError::Thread)?;
            handles.push(handle);
        }
        Ok(Server {
            node,
            handles,
            local_addr,
            admin,
        })
    }
}

/// How to let ringhub use io_uring where it is denied (said when it is).
const IO_URING_FIX: &str = "allow the io_uring_setup, io_uring_enter and io_uring_register system calls (Docker, Kubernetes: a seccomp profile that allows them, or --security-opt seccomp=unconfined; sysctl kernel.io_uring_disabled=0)";

/// The shards' I/O driver for `--io-driver`: io_uring unless it is refused or denied
/// here, when `auto` falls back to epoll and says so (a server that runs slower beats
/// one that does not run in a default container; the warning says what it costs and
/// how to get io_uring back).
fn choose_io_driver(choice: IoDriverChoice) -> Result<IoDriver, ServerError> {
    if choice == IoDriverChoice::Epoll {
        tracing::info!("the shards run on epoll (--io-driver epoll)");
        return Ok(IoDriver::Epoll);
    }
    let Some(denied) = crate::runtime::io_uring_denied() else {
        return Ok(IoDriver::IoUring);
    };
    if choice == IoDriverChoice::IoUring {
        return Err(ServerError::IoUringDenied { source: denied });
    }
    tracing::warn!(
        "io_uring is not available ({denied}): the shards run on epoll, at about {EPOLL_SHARE} of io_uring's fan-out throughput (ringhub-bench fanout-1k); to use io_uring, {IO_URING_FIX}"
    );
    Ok(IoDriver::Epoll)
}

/// What epoll delivers of io_uring's fan-out: fanout-1k 447k against 493k deliveries/s,
/// medians of 3 interleaved rounds of one run (bench/results/2026-12-07-fairness).
const EPOLL_SHARE: &str = "90 %";

/// The most a connection's socket holds unsent in the kernel (`TCP_NOTSENT_LOWAT`): a
/// write waits beyond that. Without it the kernel takes up to its send-buffer maximum
/// (4 MiB here) per connection before a slow reader makes a write wait; with 1,000
/// receivers behind, that is gigabytes of kernel memory, and past `tcp_mem` the kernel
/// throttles every socket (measured: broadcast-big fell from 1.8M to 0.55M deliveries/s
/// whenever TCP memory reached the pressure mark). What waits is kept in the session's
/// bounded queue instead, where flow control sees it.
const UNSENT_LOW_WATER: u32 = 128 << 10;

/// One listener per shard on the same address (`SO_REUSEPORT`); the first fixes the port
/// when port 0 was asked for.
fn bind_listeners(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, ServerError> {
    refuse_taken_address(addr)?;
    let mut listeners = Vec::with_capacity(count);
    let mut bind_addr = addr;
    for _ in 0..count {
        let err = |source| ServerError::Listen { addr, source };
        let socket = tcp_socket(bind_addr).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_tcp_nodelay(true).map_err(err)?;
        // Inherited by every accepted socket: see UNSENT_LOW_WATER.
        socket
            .set_tcp_notsent_lowat(UNSENT_LOW_WATER)
            .map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&bind_addr.into()).map_err(err)?;
        socket.listen(4096).map_err(err)?;
        let listener: std::net::TcpListener = socket.into();
        bind_addr = listener.local_addr().map_err(err)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A TCP socket for `addr` with `SO_REUSEADDR`, which lets a bind succeed over
/// connections in TIME_WAIT (a restart), never over a listener.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// Fails if a server listens on `addr` already. The shards' own listeners share the
/// port (`SO_REUSEPORT`), which would also let a second process share it and take half
/// the connections silently. A socket without `SO_REUSEPORT` cannot bind next to a
/// listening one, so binding one first tells; it cannot bind next to some other sockets
/// either (a client's connection that happens to use the port), so a refused bind is
/// confirmed by connecting: only a listener answers. (Port 0 picks a free port.)
fn refuse_taken_address(addr: SocketAddr) -> Result<(), ServerError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = tcp_socket(addr).map_err(|source| ServerError::Listen { addr, source })?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let target = if addr.ip().is_unspecified() {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            } else {
                addr
            };
            let timeout = std::time::Duration::from_millis(300);
            match std::net::TcpStream::connect_timeout(&target, timeout) {
                Ok(_) => Err(ServerError::AddressInUse { addr }),
                Err(_) => Ok(()),
            }
        }
        Err(source) => Err(ServerError::Listen { addr, source }),
    }
}

/// A running node.
pub struct Server {
    node: Arc<Node>,
    handles: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
    /// The listener of `--admin-listen`, when set.
    admin: Option<AdminServer>,
}

impl Server {
    /// The address it listens on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` and `/api/openapi.json` are served when `--admin-listen` moved
    /// them off [`Server::local_addr`].
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::address)
    }

    /// A handle to send and manage groups from anywhere.
    pub fn context(&self) -> HubContext {
        HubContext {
            node: self.node.clone(),
            publisher: None,
        }
    }

    /// The node's counters, as `/metrics` serves them, for an embedder's own
    /// monitoring.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.node.metrics.clone()
    }

    /// Whether every shard accepts connections.
    pub fn is_ready(&self) -> bool {
        self.node.is_ready()
    }

    #[cfg(feature = "cli")]
    /// Blocks until SIGINT or SIGTERM, then shuts down as [`Server::shutdown`] does;
    /// returns the signal. What `ringhub serve` does after starting.
    pub fn run_until_signal(self) -> std::io::Result<i32> {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        let signal = signals
            .forever()
            .next()
            .unwrap_or(signal_hook::consts::SIGTERM);
        tracing::info!(signal, "shutting down: telling clients, then exiting");
        self.shutdown();
        Ok(signal)
    }

    /// Tells every client (Close message, reconnect allowed), then stops the shards.
    /// Returns once all shard threads ended (a few seconds at most).
    pub fn shutdown(self) {
        self.node.shutting_down.store(true, Ordering::Release);
        for inbox in &self.node.inboxes {
            inbox.push(Command::Shutdown);
        }
        for handle in self.handles {
            let _ = handle.join();
        }
        if let Some(link) = &self.node.backplane {
            link.send(Outgoing::Stop);
        }
        if let Some(admin) = &self.admin {
            admin.stop();
        }
    }
}
