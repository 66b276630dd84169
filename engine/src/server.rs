//! Building, starting and stopping a node: one pinned io_uring thread per shard, each
//! with its own `SO_REUSEPORT` listener on the same address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use thiserror::Error;

use crate::auth::{
    ClaimPatterns, Claims, GroupAuthorizer, JwtVerifier, SubClaimUserId, UserIdProvider,
};
use crate::config::Config;
use crate::hub::{Hub, HubContext};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::router::{Command, Inbox};
use crate::shard;
use crate::store::{MembershipStore, RedbStore, StoreError};

/// Why a server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("--data: {0}")]
    Store(#[from] StoreError),
}

/// Makes one hub instance per shard.
pub type HubFactory = Arc<dyn Fn() -> Box<dyn Hub> + Send + Sync>;

/// A connection negotiated but not yet connected.
pub(crate) struct Negotiated {
    pub connection_id: String,
    pub hub: String,
    pub created: Instant,
}

/// How long a negotiated connection waits for its transport (SignalR's DisconnectTimeout).
pub(crate) const NEGOTIATION_TTL: Duration = Duration::from_secs(15);

/// A store write, run on the store thread.
pub(crate) type StoreJob = Box<dyn FnOnce(&dyn MembershipStore) + Send>;

/// What all shards share: configuration, inboxes, counters. Read-mostly; the only lock
/// guards negotiate tokens, which are touched once per connection, never per message.
pub struct Shared {
    pub(crate) config: Config,
    pub(crate) inboxes: Vec<Inbox>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) jwt: Option<JwtVerifier>,
    pub(crate) user_ids: Arc<dyn UserIdProvider>,
    pub(crate) authorizer: Arc<dyn GroupAuthorizer>,
    pub(crate) hub_factory: HubFactory,
    pub(crate) negotiations: Mutex<HashMap<String, Negotiated>>,
    pub(crate) presence: Presence,
    pub(crate) store: Arc<dyn MembershipStore>,
    /// Store writes run on their own thread (a commit waits for the disk).
    pub(crate) store_jobs: std::sync::mpsc::Sender<StoreJob>,
    pub(crate) ready_shards: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
}

impl Shared {
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn is_ready(&self) -> bool {
        !self.is_shutting_down() && self.ready_shards.load(Ordering::Acquire) == self.inboxes.len()
    }

    /// May this connection join (and send to) `group`?
    pub(crate) fn may_join(&self, claims: Option<&Claims>, group: &str) -> bool {
        self.authorizer.may_join(claims, group)
    }
}

/// Configures a server.
pub struct ServerBuilder {
    config: Config,
    hub_factory: HubFactory,
    user_ids: Arc<dyn UserIdProvider>,
    authorizer: Arc<dyn GroupAuthorizer>,
    store: Option<Arc<dyn MembershipStore>>,
}

impl ServerBuilder {
    /// A server running the contract's built-in hub.
    pub fn new(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            hub_factory: Arc::new(|| Box::new(crate::builtin::BuiltinHub)),
            user_ids: Arc::new(SubClaimUserId),
            authorizer: Arc::new(ClaimPatterns),
            store: None,
        }
    }

    /// Runs your own hub (one instance per shard, made by `factory`).
    pub fn hub<H: Hub>(mut self, factory: impl Fn() -> H + Send + Sync + 'static) -> Self {
        self.hub_factory = Arc::new(move || Box::new(factory()));
        self
    }

    pub fn user_id_provider(mut self, provider: impl UserIdProvider) -> Self {
        self.user_ids = Arc::new(provider);
        self
    }

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
        let threads = self.config.threads;
        let store: Arc<dyn MembershipStore> = match self.store {
            Some(store) => store,
            None => Arc::new(RedbStore::open(&self.config.data)?),
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
        let shared = Arc::new(Shared {
            jwt: self
                .config
                .jwt_secret
                .as_deref()
                .map(|s| JwtVerifier::hs256(s.as_bytes())),
            config: self.config,
            inboxes: (0..threads).map(|_| Inbox::default()).collect(),
            metrics: Arc::new(Metrics::new(threads)),
            user_ids: self.user_ids,
            authorizer: self.authorizer,
            hub_factory: self.hub_factory,
            negotiations: Mutex::new(HashMap::new()),
            presence: Presence::new(threads),
            store,
            store_jobs,
            ready_shards: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
        });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut handles = Vec::with_capacity(threads);
        for (index, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("ringhub-shard-{index}"))
                .spawn(move || shard::run(index, index % cores, listener, shared))
                .map_err(ServerError::Thread)?;
            handles.push(handle);
        }
        Ok(Server {
            shared,
            handles,
            local_addr,
        })
    }
}

/// One listener per shard on the same address (`SO_REUSEPORT`); the first fixes the port
/// when port 0 was asked for.
fn bind_listeners(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, ServerError> {
    let mut listeners = Vec::with_capacity(count);
    let mut bind_addr = addr;
    for _ in 0..count {
        let err = |source| ServerError::Listen { addr, source };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(bind_addr),
            socket2::Type::STREAM,
            None,
        )
        .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_nodelay(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&bind_addr.into()).map_err(err)?;
        socket.listen(4096).map_err(err)?;
        let listener: std::net::TcpListener = socket.into();
        bind_addr = listener.local_addr().map_err(err)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A running node.
pub struct Server {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl Server {
    /// The address it listens on (the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to send and manage groups from anywhere.
    pub fn context(&self) -> HubContext {
        HubContext {
            shared: self.shared.clone(),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Whether every shard accepts connections.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

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
        self.shared.shutting_down.store(true, Ordering::Release);
        for inbox in &self.shared.inboxes {
            inbox.push(Command::Shutdown);
        }
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}
