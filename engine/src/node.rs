//! What every shard of a node shares: configuration, the shards' inboxes, counters,
//! authentication, presence and the membership store. Read-mostly; nothing here is
//! touched per delivered message.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::auth::{AccessKeys, Claims, GroupAuthorizer, JwtVerifier, UserIdProvider};
use crate::backplane::Link;
use crate::config::Config;
use crate::flow::Window;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::quota::Quota;
use crate::shard::inbox::Inbox;
use crate::store::{MembershipExpiry, MembershipStore};

/// A store write, run on the store thread.
pub(crate) type StoreJob = Box<dyn FnOnce(&dyn MembershipStore) + Send>;

/// What all shards of a node share: configuration, inboxes, counters. Read-mostly;
/// connection tokens are not here: each shard keeps its own (`shard::tokens`).
pub struct Node {
    pub(crate) config: Config,
    pub(crate) inboxes: Vec<Inbox>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) jwt: Option<JwtVerifier>,
    /// Azure access keys (`--access-key`): the Azure-compatible REST API and client
    /// endpoint check tokens with them; whatever signs for Azure apps takes them here.
    pub(crate) access_keys: Option<AccessKeys>,
    pub(crate) user_ids: Arc<dyn UserIdProvider>,
    pub(crate) authorizer: Arc<dyn GroupAuthorizer>,
    pub(crate) presence: Presence,
    /// Which hub names are served, and under which paths.
    pub(crate) hub_routes: crate::api::types::HubRoutes,
    /// Client results waiting for their clients' answers.
    pub(crate) client_results: crate::client_results::ClientResults,
    pub(crate) store: Arc<dyn MembershipStore>,
    /// Timers of durable memberships granted with a time to live (Azure's `ttl`).
    pub(crate) membership_expiry: MembershipExpiry,
    /// Store writes run on their own thread (a commit waits for the disk).
    pub(crate) store_jobs: std::sync::mpsc::Sender<StoreJob>,
    pub(crate) ready_shards: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    /// Round-robin over the shards for the sessions negotiate creates.
    pub(crate) next_owner: AtomicUsize,
    /// What sends through `HubContext`s other than a hub method's (REST, embedders)
    /// may have on their way together.
    pub(crate) context_budget: Arc<Window>,
    /// Where events and invocations the node does not serve itself go (`--upstream`).
    pub(crate) upstream: Option<crate::upstream::Upstream>,
    /// The cluster's backplane thread (with `--redis`).
    pub(crate) backplane: Option<Link>,
    /// Sessions of every transport (`--max-connections`): a WebSocket holds a
    /// descriptor, an SSE or long-polling session between requests none, and both hold
    /// memory and groups.
    pub(crate) sessions: Arc<Quota>,
    /// Tokens negotiated and not used by a transport yet (they expire after the
    /// disconnect timeout; negotiates cost nothing to send).
    pub(crate) negotiations: Arc<Quota>,
    /// Bytes POSTed for sessions whose first receive request has not come yet.
    pub(crate) early_input: Arc<Quota>,
    /// The membership store is the cluster's, in Redis (`backplane::RedisStore`): read
    /// at connect time and changed through the backplane, without blocking a shard. An
    /// embedder's own store is read as any store is, also in a cluster.
    pub(crate) durable_in_redis: bool,
    /// How the shards do I/O (decided at start: `--io-driver`, and whether the kernel
    /// lets this process use io_uring).
    pub io_driver: crate::runtime::IoDriver,
    /// The version of durable membership in a store other than Redis: one number for
    /// the node, raised by every change after it is stored (Redis keeps its own, per
    /// user, for the whole cluster). See `store::DurableGroups`.
    durable_version: AtomicU64,
}

impl Node {
    pub(crate) fn new(
        config: Config,
        user_ids: Arc<dyn UserIdProvider>,
        authorizer: Arc<dyn GroupAuthorizer>,
        store: Arc<dyn MembershipStore>,
        store_jobs: std::sync::mpsc::Sender<StoreJob>,
        backplane: Option<Link>,
    ) -> Node {
        let shards = config.threads;
        let context_budget = Window::new(config.context_publish_budget(), None);
        let sessions = Quota::new(config.max_connections);
        let negotiations = Quota::new(config.max_connections);
        let early_input = Quota::new(config.early_input_budget());
        Node {
            jwt: config
                .jwt_secret
                .as_deref()
                .map(|s| JwtVerifier::hs256(s.as_bytes(), config.jwt_leeway)),
            access_keys: AccessKeys::new(&config.access_keys, config.jwt_leeway),
            config,
            inboxes: (0..shards).map(|_| Inbox::default()).collect(),
            metrics: Arc::new(Metrics::new(shards)),
            user_ids,
            authorizer,
            presence: Presence::with_backplane(shards, backplane.clone()),
            client_results: Default::default(),
            hub_routes: Default::default(),
            store,
            membership_expiry: MembershipExpiry::default(),
            store_jobs,
            ready_shards: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            next_owner: AtomicUsize::new(0),
            context_budget,
            durable_in_redis: false,
            io_driver: crate::runtime::IoDriver::IoUring,
            upstream: None,
            backplane,
            sessions,
            negotiations,
            early_input,
            durable_version: AtomicU64::new(0),
        }
    }

    /// The version of durable membership in a local store now.
    pub(crate) fn durable_version(&self) -> u64 {
        self.durable_version.load(Ordering::Acquire)
    }

    /// A durable change was stored in a local store: its version.
    pub(crate) fn next_durable_version(&self) -> u64 {
        self.durable_version.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The shard the next negotiated session will live on.
    pub(crate) fn next_owner(&self) -> usize {
        self.next_owner.fetch_add(1, Ordering::Relaxed) % self.inboxes.len()
    }

    /// Whether every shard accepts connections (liveness: `/healthz`).
    pub(crate) fn is_ready(&self) -> bool {
        !self.is_shutting_down() && self.ready_shards.load(Ordering::Acquire) == self.inboxes.len()
    }

    /// Whether the node can do its whole job now (`/readyz`): its shards accept
    /// connections, it is not stopping, and in a cluster it reaches Redis. `Err` says
    /// why not.
    pub(crate) fn readiness(&self) -> Result<(), &'static str> {
        if self.is_shutting_down() {
            return Err("the node is stopping");
        }
        if self.ready_shards.load(Ordering::Acquire) < self.inboxes.len() {
            return Err("the node is starting: not every shard accepts connections yet");
        }
        if self
            .backplane
            .as_ref()
            .is_some_and(|link| !link.is_connected())
        {
            return Err("the node cannot reach Redis: cross-node sends, presence and durable membership are not served");
        }
        Ok(())
    }

    /// May this connection join (and send to) `group`?
    pub(crate) fn may_join(&self, claims: Option<&Claims>, group: &str) -> bool {
        self.authorizer.may_join(claims, group)
    }
}
