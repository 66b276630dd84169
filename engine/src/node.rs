//! What every shard of a node shares: configuration, the shards' inboxes, counters,
//! authentication, presence and the membership store. Read-mostly; nothing here is
//! touched per delivered message.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::auth::{Claims, GroupAuthorizer, JwtVerifier, UserIdProvider};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::shard::inbox::Inbox;
use crate::store::MembershipStore;

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

/// What all shards of a node share: configuration, inboxes, counters. Read-mostly; the only lock
/// guards negotiate tokens, which are touched once per connection, never per message.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) inboxes: Vec<Inbox>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) jwt: Option<JwtVerifier>,
    pub(crate) user_ids: Arc<dyn UserIdProvider>,
    pub(crate) authorizer: Arc<dyn GroupAuthorizer>,
    pub(crate) negotiations: Mutex<HashMap<String, Negotiated>>,
    pub(crate) presence: Presence,
    pub(crate) store: Arc<dyn MembershipStore>,
    /// Store writes run on their own thread (a commit waits for the disk).
    pub(crate) store_jobs: std::sync::mpsc::Sender<StoreJob>,
    pub(crate) ready_shards: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
}

impl Node {
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
