//! Presence across shards: who is connected, which shard holds each connection, and
//! how many connections and distinct users every group has.
//!
//! Shards own their connections and route messages from their own tables; this
//! registry is the one place that sees all shards at once. It is touched on connect,
//! disconnect, join, leave and presence queries, never on the message path, so one
//! short lock suffices (held for a few hash-map operations). Watchers of a group are
//! told of changes by their own shard, which collects the changed groups here and
//! sends at most one `PresenceChanged` per group every [`PRESENCE_INTERVAL`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use ringhub_protocol::Value;

use crate::backplane::{self, GroupSnapshot, HubSnapshot, Link, Outgoing, PresenceEvent};

/// How often a shard tells its watchers about groups whose counts changed.
pub const PRESENCE_INTERVAL: Duration = Duration::from_millis(100);

/// The method watchers receive (contract section 4, `WatchPresence`).
pub const PRESENCE_CHANGED: &str = "PresenceChanged";

/// A group's presence: its connections and the distinct users among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPresence {
    /// The group's member connections, anonymous ones included.
    pub connections: usize,
    /// Distinct user ids of the group's connections (anonymous ones count only as
    /// connections), sorted.
    pub user_ids: Vec<String>,
}

impl GroupPresence {
    /// The number of distinct users.
    pub fn users(&self) -> usize {
        self.user_ids.len()
    }

    /// `{"connections": n, "users": m}`: the result of `GroupCount`.
    pub fn counts_value(&self) -> Value {
        Value::Map(self.count_entries())
    }

    /// `{"group": g, "connections": n, "users": m}`: the argument of `PresenceChanged`.
    pub fn changed_value(&self, group: &str) -> Value {
        let mut entries = vec![("group".into(), group.into())];
        entries.extend(self.count_entries());
        Value::Map(entries)
    }

    fn count_entries(&self) -> Vec<(Value, Value)> {
        vec![
            (
                "connections".into(),
                Value::from_u64(self.connections as u64),
            ),
            ("users".into(), Value::from_u64(self.users() as u64)),
        ]
    }
}

#[derive(Default)]
struct GroupEntry {
    connections: usize,
    /// user id -> how many of its connections are in the group.
    users: HashMap<String, usize>,
    /// shard -> how many of its connections watch the group (local entries only).
    watchers: HashMap<usize, usize>,
}

impl GroupEntry {
    fn is_unused(&self) -> bool {
        self.connections == 0 && self.watchers.is_empty()
    }
}

struct ConnectionEntry {
    shard: usize,
    user: Option<String>,
}

#[derive(Default)]
struct HubEntry {
    groups: HashMap<String, GroupEntry>,
    /// user id -> its connection ids.
    users: HashMap<String, HashSet<String>>,
    connections: HashMap<String, ConnectionEntry>,
}

/// hub name -> its presence: this node's, or what another node told of its own.
type Hubs = HashMap<String, HubEntry>;

/// Adds a connection; true if it is its user's first one here.
fn add_connection(hubs: &mut Hubs, hub: &str, id: &str, user: Option<&str>, shard: usize) -> bool {
    let entry = hubs.entry_ref(hub).or_default();
    entry.connections.insert(
        id.to_owned(),
        ConnectionEntry {
            shard,
            user: user.map(str::to_owned),
        },
    );
    let Some(user) = user else {
        return false;
    };
    let ids = entry.users.entry_ref(user).or_default();
    ids.insert(id.to_owned());
    ids.len() == 1
}

/// Forgets a connection; `Some(user)` if it was its user's last one here.
fn remove_connection(hubs: &mut Hubs, hub: &str, id: &str) -> Option<String> {
    let entry = hubs.get_mut(hub)?;
    let mut last_of = None;
    if let Some(user) = entry.connections.remove(id).and_then(|c| c.user) {
        if let Some(ids) = entry.users.get_mut(&user) {
            ids.remove(id);
            if ids.is_empty() {
                entry.users.remove(&user);
                last_of = Some(user);
            }
        }
    }
    if entry.connections.is_empty() && entry.groups.is_empty() {
        hubs.remove(hub);
    }
    last_of
}

/// A connection (of `user`, if any) joined `group`; true if the group was empty.
fn add_member(hubs: &mut Hubs, hub: &str, group: &str, user: Option<&str>) -> bool {
    let entry = hubs
        .entry_ref(hub)
        .or_default()
        .groups
        .entry_ref(group)
        .or_default();
    // Saturating: another node's counts (a snapshot) are input like any other.
    entry.connections = entry.connections.saturating_add(1);
    if let Some(user) = user {
        let count = entry.users.entry_ref(user).or_default();
        *count = count.saturating_add(1);
    }
    entry.connections == 1
}

/// A connection (of `user`, if any) left `group`: `Some(emptied)` if it was counted.
fn remove_member(hubs: &mut Hubs, hub: &str, group: &str, user: Option<&str>) -> Option<bool> {
    let hub_entry = hubs.get_mut(hub)?;
    let entry = hub_entry.groups.get_mut(group)?;
    // Only a member leaves (the shard tables say so); an entry kept alive by its
    // watchers alone has no connection to take away.
    if entry.connections == 0 {
        return None;
    }
    entry.connections -= 1;
    if let Some(user) = user {
        if let Some(count) = entry.users.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                entry.users.remove(user);
            }
        }
    }
    let emptied = entry.connections == 0;
    if entry.is_unused() {
        hub_entry.groups.remove(group);
    }
    Some(emptied)
}

/// What another node of the cluster told of its presence.
struct RemoteNode {
    name: String,
    hubs: Hubs,
    /// The last of its changes applied here.
    seq: u64,
    /// A snapshot was asked for and has not arrived: changes are not applied meanwhile.
    awaiting_snapshot: bool,
    last_heard: Instant,
}

#[derive(Default)]
struct Registry {
    local: Hubs,
    /// Other nodes, by node id.
    remote: HashMap<String, RemoteNode>,
    /// Changes made to `local` so far (numbered for the other nodes).
    seq: u64,
    /// Per shard: the (hub, group) pairs whose counts changed since it last looked.
    changed: Vec<HashSet<(String, String)>>,
    /// Groups with at least one member here, over all hubs (the `ringhub_groups` gauge).
    nonempty_groups: usize,
}

impl Registry {
    /// Every group's entry: this node's first, then each other node's.
    fn group_entries<'a>(
        &'a self,
        hub: &'a str,
        group: &'a str,
    ) -> impl Iterator<Item = &'a GroupEntry> {
        std::iter::once(&self.local)
            .chain(self.remote.values().map(|node| &node.hubs))
            .filter_map(move |hubs| hubs.get(hub)?.groups.get(group))
    }

    fn hub_entries<'a>(&'a self, hub: &'a str) -> impl Iterator<Item = &'a HubEntry> {
        std::iter::once(&self.local)
            .chain(self.remote.values().map(|node| &node.hubs))
            .filter_map(move |hubs| hubs.get(hub))
    }

    /// Notes, for every shard that watches the group, that its counts changed.
    fn mark_changed(&mut self, pending: &[AtomicBool], hub: &str, group: &str) {
        let Some(entry) = self.local.get(hub).and_then(|h| h.groups.get(group)) else {
            return;
        };
        for &shard in entry.watchers.keys() {
            self.changed[shard].insert((hub.to_owned(), group.to_owned()));
            pending[shard].store(true, Ordering::Release);
        }
    }

    /// Marks every watched group of the hubs of `hubs` as changed (a node's presence
    /// was replaced or dropped whole).
    fn mark_all_changed(&mut self, pending: &[AtomicBool], hubs: &[String]) {
        let mut watched = Vec::new();
        for hub in hubs {
            if let Some(entry) = self.local.get(hub) {
                for (group, g) in &entry.groups {
                    if !g.watchers.is_empty() {
                        watched.push((hub.clone(), group.clone()));
                    }
                }
            }
        }
        for (hub, group) in watched {
            self.mark_changed(pending, &hub, &group);
        }
    }

    /// Numbers a local change and hands it to the backplane (under the lock, so the
    /// other nodes see this node's changes in the order it made them).
    fn publish(&mut self, link: Option<&Link>, event: impl FnOnce() -> PresenceEvent) {
        if let Some(link) = link {
            self.seq += 1;
            link.send(Outgoing::Presence {
                seq: self.seq,
                event: event(),
            });
        }
    }
}

/// The registry (one per server).
pub struct Presence {
    registry: Mutex<Registry>,
    /// Per shard: whether it has changes to collect (checked without the lock).
    pending: Vec<AtomicBool>,
    /// The cluster's backplane, when there is one: told of every change, and of the
    /// channels this node needs (a group's while it has a member here, a user's and a
    /// connection's while connected here).
    link: Option<Link>,
}

impl Presence {
    /// An empty registry for a node of `shards` shards, with no cluster to tell.
    pub fn new(shards: usize) -> Presence {
        Presence::with_backplane(shards, None)
    }

    pub(crate) fn with_backplane(shards: usize, link: Option<Link>) -> Presence {
        Presence {
            registry: Mutex::new(Registry {
                changed: vec![HashSet::new(); shards],
                ..Registry::default()
            }),
            pending: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            link,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Every update below completes or changes nothing, so a poisoned lock (a panic
        // elsewhere while holding it) still guards consistent tables.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(&self, channel: String, subscribe: bool) {
        if let Some(link) = &self.link {
            link.send(if subscribe {
                Outgoing::Subscribe(channel)
            } else {
                Outgoing::Unsubscribe(channel)
            });
        }
    }

    /// Records a connection of `hub` held by `shard` (and its user, if any), so that
    /// sends find its shard and presence counts it; in a cluster, tells the other nodes
    /// and subscribes its channels.
    pub fn connected(&self, hub: &str, connection_id: &str, user: Option<&str>, shard: usize) {
        let mut registry = self.lock();
        let first_of_user = add_connection(&mut registry.local, hub, connection_id, user, shard);
        self.subscribe(backplane::connection_channel(hub, connection_id), true);
        if first_of_user {
            self.subscribe(backplane::user_channel(hub, user.unwrap_or_default()), true);
        }
        registry.publish(self.link.as_ref(), || PresenceEvent::Connected {
            hub: hub.to_owned(),
            connection_id: connection_id.to_owned(),
            user: user.map(str::to_owned),
        });
    }

    /// Forgets a connection; its groups must have been left (see [`Presence::left`]).
    pub fn disconnected(&self, hub: &str, connection_id: &str) {
        let mut registry = self.lock();
        if !registry
            .local
            .get(hub)
            .is_some_and(|h| h.connections.contains_key(connection_id))
        {
            return;
        }
        if let Some(user) = remove_connection(&mut registry.local, hub, connection_id) {
            self.subscribe(backplane::user_channel(hub, &user), false);
        }
        self.subscribe(backplane::connection_channel(hub, connection_id), false);
        registry.publish(self.link.as_ref(), || PresenceEvent::Disconnected {
            hub: hub.to_owned(),
            connection_id: connection_id.to_owned(),
        });
    }

    /// A connection (of `user`, if any) joined `group`.
    pub fn joined(&self, hub: &str, group: &str, user: Option<&str>) {
        let mut registry = self.lock();
        if add_member(&mut registry.local, hub, group, user) {
            registry.nonempty_groups += 1;
            self.subscribe(backplane::group_channel(hub, group), true);
        }
        registry.mark_changed(&self.pending, hub, group);
        registry.publish(self.link.as_ref(), || PresenceEvent::Joined {
            hub: hub.to_owned(),
            group: group.to_owned(),
            user: user.map(str::to_owned),
        });
    }

    /// A connection (of `user`, if any) left `group`.
    pub fn left(&self, hub: &str, group: &str, user: Option<&str>) {
        let mut registry = self.lock();
        let Some(emptied) = remove_member(&mut registry.local, hub, group, user) else {
            return;
        };
        if emptied {
            registry.nonempty_groups -= 1;
            self.subscribe(backplane::group_channel(hub, group), false);
        }
        registry.mark_changed(&self.pending, hub, group);
        registry.publish(self.link.as_ref(), || PresenceEvent::Left {
            hub: hub.to_owned(),
            group: group.to_owned(),
            user: user.map(str::to_owned),
        });
    }

    /// A connection on `shard` starts (or stops) watching `group`.
    pub fn watch(&self, hub: &str, group: &str, shard: usize, watch: bool) {
        let mut registry = self.lock();
        let hub_entry = registry.local.entry_ref(hub).or_default();
        let entry = hub_entry.groups.entry_ref(group).or_default();
        if watch {
            *entry.watchers.entry(shard).or_default() += 1;
        } else if let Some(count) = entry.watchers.get_mut(&shard) {
            *count -= 1;
            if *count == 0 {
                entry.watchers.remove(&shard);
            }
        }
        if entry.is_unused() {
            hub_entry.groups.remove(group);
        }
    }

    /// A group's connections and distinct users, over every node of the cluster.
    pub fn group(&self, hub: &str, group: &str) -> GroupPresence {
        let registry = self.lock();
        let mut connections = 0;
        let mut users = HashSet::new();
        for entry in registry.group_entries(hub, group) {
            connections = entry.connections.saturating_add(connections);
            users.extend(entry.users.keys());
        }
        let mut user_ids: Vec<String> = users.into_iter().cloned().collect();
        user_ids.sort_unstable();
        GroupPresence {
            connections,
            user_ids,
        }
    }

    /// The user's connection ids on every node (empty when offline), sorted.
    pub fn user_connections(&self, hub: &str, user: &str) -> Vec<String> {
        let registry = self.lock();
        let mut ids: Vec<String> = registry
            .hub_entries(hub)
            .filter_map(|h| h.users.get(user))
            .flatten()
            .cloned()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether the user has a connection to `hub` here or, as far as this node was
    /// told, on another node.
    pub fn is_user_online(&self, hub: &str, user: &str) -> bool {
        let registry = self.lock();
        let online = registry
            .hub_entries(hub)
            .any(|h| h.users.contains_key(user));
        online
    }

    /// The shard that holds a connection, if it is connected to this node.
    pub fn shard_of(&self, hub: &str, connection_id: &str) -> Option<usize> {
        let registry = self.lock();
        registry
            .local
            .get(hub)?
            .connections
            .get(connection_id)
            .map(|c| c.shard)
    }

    /// The ids of the hub's connections on every node (as far as this node was told),
    /// sorted.
    pub fn hub_connections(&self, hub: &str) -> Vec<String> {
        let registry = self.lock();
        let mut ids: Vec<String> = registry
            .hub_entries(hub)
            .flat_map(|h| h.connections.keys().cloned())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether a connection is connected to any node (as far as this node was told).
    pub fn is_connected(&self, hub: &str, connection_id: &str) -> bool {
        let registry = self.lock();
        let connected = registry
            .hub_entries(hub)
            .any(|h| h.connections.contains_key(connection_id));
        connected
    }

    /// The groups with members on this node, over all hubs and shards.
    pub fn nonempty_groups(&self) -> usize {
        self.lock().nonempty_groups
    }

    /// Takes the groups watched on `shard` whose counts changed, with their counts now.
    pub fn take_changes(&self, shard: usize) -> Vec<(String, String, GroupPresence)> {
        if !self.pending[shard].swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let changed = std::mem::take(&mut self.lock().changed[shard]);
        changed
            .into_iter()
            .map(|(hub, group)| {
                let presence = self.group(&hub, &group);
                (hub, group, presence)
            })
            .collect()
    }
}

/// What the backplane thread does with other nodes' presence.
impl Presence {
    /// This node's presence whole, and the number of its last change.
    pub(crate) fn local_snapshot(&self) -> (u64, Vec<HubSnapshot>) {
        let registry = self.lock();
        let hubs = registry
            .local
            .iter()
            .map(|(hub, entry)| HubSnapshot {
                hub: hub.clone(),
                connections: entry
                    .connections
                    .iter()
                    .map(|(id, c)| (id.clone(), c.user.clone()))
                    .collect(),
                groups: entry
                    .groups
                    .iter()
                    .filter(|(_, g)| g.connections > 0)
                    .map(|(group, g)| GroupSnapshot {
                        group: group.clone(),
                        connections: g.connections as u64,
                        users: g
                            .users
                            .iter()
                            .map(|(u, n)| (u.clone(), *n as u64))
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        (registry.seq, hubs)
    }

    /// Another node's change; false if changes of it were missed (it should be asked
    /// for a snapshot).
    pub(crate) fn apply_remote(&self, origin: &str, seq: u64, event: PresenceEvent) -> bool {
        let mut registry = self.lock();
        let registry = &mut *registry;
        let Some(node) = registry.remote.get_mut(origin) else {
            return false;
        };
        node.last_heard = Instant::now();
        if node.awaiting_snapshot || seq <= node.seq {
            // Older than the snapshot applied (or the snapshot is on its way).
            return true;
        }
        if seq != node.seq + 1 {
            node.awaiting_snapshot = true;
            return false;
        }
        node.seq = seq;
        let hubs = &mut node.hubs;
        let changed = match &event {
            PresenceEvent::Connected {
                hub,
                connection_id,
                user,
            } => {
                add_connection(hubs, hub, connection_id, user.as_deref(), 0);
                None
            }
            PresenceEvent::Disconnected { hub, connection_id } => {
                remove_connection(hubs, hub, connection_id);
                None
            }
            PresenceEvent::Joined { hub, group, user } => {
                add_member(hubs, hub, group, user.as_deref());
                Some((hub, group))
            }
            PresenceEvent::Left { hub, group, user } => {
                remove_member(hubs, hub, group, user.as_deref());
                Some((hub, group))
            }
        };
        if let Some((hub, group)) = changed {
            registry.mark_changed(&self.pending, hub, group);
        }
        true
    }

    /// Another node's presence whole, replacing what was known of it.
    pub(crate) fn apply_snapshot(&self, origin: &str, seq: u64, snapshot: Vec<HubSnapshot>) {
        let mut hubs = Hubs::new();
        for hub in snapshot {
            let entry = hubs.entry_ref(hub.hub.as_str()).or_default();
            for (id, user) in hub.connections {
                if let Some(user) = &user {
                    entry
                        .users
                        .entry_ref(user.as_str())
                        .or_default()
                        .insert(id.clone());
                }
                entry
                    .connections
                    .insert(id, ConnectionEntry { shard: 0, user });
            }
            for group in hub.groups {
                entry.groups.insert(
                    group.group,
                    GroupEntry {
                        connections: group.connections as usize,
                        users: group
                            .users
                            .into_iter()
                            .map(|(u, n)| (u, n as usize))
                            .collect(),
                        watchers: HashMap::new(),
                    },
                );
            }
        }
        let mut registry = self.lock();
        let name = registry
            .remote
            .get(origin)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        let mut touched: Vec<String> = hubs.keys().cloned().collect();
        let old = registry.remote.insert(
            origin.to_owned(),
            RemoteNode {
                name,
                hubs,
                seq,
                awaiting_snapshot: false,
                last_heard: Instant::now(),
            },
        );
        touched.extend(old.into_iter().flat_map(|n| n.hubs.into_keys()));
        registry.mark_all_changed(&self.pending, &touched);
    }

    /// Another node is alive and has published changes up to `seq`. Returns whether it
    /// should be asked for a snapshot (it is new here, or changes of it were missed).
    pub(crate) fn heard_from(&self, origin: &str, name: &str, seq: Option<u64>) -> bool {
        let mut registry = self.lock();
        let node = registry
            .remote
            .entry_ref(origin)
            .or_insert_with(|| RemoteNode {
                name: name.to_owned(),
                hubs: Hubs::new(),
                seq: 0,
                awaiting_snapshot: true,
                last_heard: Instant::now(),
            });
        node.last_heard = Instant::now();
        if !name.is_empty() {
            node.name = name.to_owned();
        }
        let behind = seq.is_some_and(|seq| seq > node.seq);
        if behind && !node.awaiting_snapshot {
            node.awaiting_snapshot = true;
            return true;
        }
        node.awaiting_snapshot && seq.is_some()
    }

    /// Forgets the nodes not heard from within `silence`, and the other nodes named
    /// `name` but `keep` (a node that restarted): they no longer count.
    pub(crate) fn forget_nodes(&self, silence: Duration, name: Option<(&str, &str)>) {
        self.forget_where(|id, node| {
            node.last_heard.elapsed() > silence
                || name.is_some_and(|(name, keep)| node.name == name && id != keep)
        });
    }

    /// The other nodes not heard from within `silence` (each with its name).
    pub(crate) fn silent_nodes(&self, silence: Duration) -> Vec<(String, String)> {
        let registry = self.lock();
        registry
            .remote
            .iter()
            .filter(|(_, node)| node.last_heard.elapsed() > silence)
            .map(|(id, node)| (id.clone(), node.name.clone()))
            .collect()
    }

    /// Forgets a node that said it stops.
    pub(crate) fn forget_node(&self, origin: &str) {
        self.forget_where(|id, _| id == origin);
    }

    fn forget_where(&self, gone: impl Fn(&str, &RemoteNode) -> bool) {
        let mut registry = self.lock();
        let gone: Vec<String> = registry
            .remote
            .iter()
            .filter(|(id, node)| gone(id, node))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(node) = registry.remote.remove(&id) {
                tracing::info!(node = %node.name, "a cluster node is gone: its connections no longer count");
                let hubs: Vec<String> = node.hubs.into_keys().collect();
                registry.mark_all_changed(&self.pending, &hubs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_connections_and_distinct_users() {
        let presence = Presence::new(2);
        presence.connected("h", "c1", Some("ann"), 0);
        presence.connected("h", "c2", Some("ann"), 1);
        presence.connected("h", "c3", None, 1);
        for user in [Some("ann"), Some("ann"), None] {
            presence.joined("h", "g", user);
        }
        let group = presence.group("h", "g");
        assert_eq!((group.connections, group.users()), (3, 1));
        assert_eq!(presence.nonempty_groups(), 1);
        assert_eq!(presence.user_connections("h", "ann"), ["c1", "c2"]);
        assert_eq!(presence.shard_of("h", "c2"), Some(1));

        presence.left("h", "g", Some("ann"));
        assert_eq!(presence.group("h", "g").users(), 1);
        presence.left("h", "g", Some("ann"));
        presence.left("h", "g", None);
        assert_eq!(presence.group("h", "g"), GroupPresence::default());
        assert_eq!(presence.nonempty_groups(), 0);

        presence.disconnected("h", "c1");
        assert!(presence.is_user_online("h", "ann"));
        presence.disconnected("h", "c2");
        assert!(!presence.is_user_online("h", "ann"));
        assert_eq!(presence.shard_of("h", "c2"), None);
    }

    #[test]
    fn watchers_collect_each_changed_group_once() {
        let presence = Presence::new(2);
        assert!(presence.take_changes(1).is_empty());
        presence.watch("h", "g", 1, true);
        presence.joined("h", "g", Some("ann"));
        presence.joined("h", "g", Some("bob"));
        presence.joined("h", "other", Some("bob"));
        assert!(
            presence.take_changes(0).is_empty(),
            "shard 0 watches nothing"
        );
        let changes = presence.take_changes(1);
        assert_eq!(changes.len(), 1);
        assert_eq!((changes[0].2.connections, changes[0].2.users()), (2, 2));
        assert!(presence.take_changes(1).is_empty());

        presence.left("h", "g", Some("ann"));
        presence.left("h", "g", Some("bob"));
        let changes = presence.take_changes(1);
        assert_eq!(changes[0].2, GroupPresence::default());
        // The watcher keeps the emptied group known until it stops watching.
        presence.watch("h", "g", 1, false);
        presence.joined("h", "g", None);
        assert!(presence.take_changes(1).is_empty());
    }

    fn joined(hub: &str, group: &str, user: Option<&str>) -> PresenceEvent {
        PresenceEvent::Joined {
            hub: hub.into(),
            group: group.into(),
            user: user.map(Into::into),
        }
    }

    #[test]
    fn other_nodes_count_once_known_and_stop_counting_once_gone() {
        let presence = Presence::new(1);
        presence.connected("h", "here", Some("ann"), 0);
        presence.joined("h", "g", Some("ann"));
        presence.watch("h", "g", 0, true);

        // A node first heard of is asked for its snapshot; its changes wait for it.
        assert!(presence.heard_from("n2", "b", Some(3)));
        assert!(presence.apply_remote("n2", 4, joined("h", "g", Some("bob"))));
        assert_eq!(
            presence.group("h", "g").connections,
            1,
            "not applied before the snapshot"
        );
        let snapshot = vec![HubSnapshot {
            hub: "h".into(),
            connections: vec![
                ("there".into(), Some("ann".into())),
                ("x".into(), Some("bob".into())),
            ],
            groups: vec![GroupSnapshot {
                group: "g".into(),
                connections: 1,
                users: vec![("ann".into(), 1)],
            }],
        }];
        presence.apply_snapshot("n2", 3, snapshot);
        assert!(
            !presence.take_changes(0).is_empty(),
            "watchers told of the snapshot"
        );
        let group = presence.group("h", "g");
        assert_eq!(
            (group.connections, group.user_ids.clone()),
            (2, vec!["ann".to_owned()])
        );
        assert_eq!(presence.user_connections("h", "ann"), ["here", "there"]);
        assert!(presence.is_connected("h", "there"));
        assert_eq!(presence.shard_of("h", "there"), None, "not on this node");

        // In order: applied, and the watchers told.
        assert!(presence.apply_remote("n2", 4, joined("h", "g", Some("bob"))));
        assert_eq!(presence.group("h", "g").users(), 2);
        assert_eq!(presence.take_changes(0)[0].2.connections, 3);
        // Already applied (a change the snapshot included): ignored.
        assert!(presence.apply_remote("n2", 4, joined("h", "g", Some("bob"))));
        assert_eq!(presence.group("h", "g").connections, 3);
        // A gap: not applied, and a snapshot is wanted (once, until it arrives).
        assert!(!presence.apply_remote("n2", 6, joined("h", "g", None)));
        assert_eq!(presence.group("h", "g").connections, 3);
        assert!(!presence.heard_from("n2", "b", None));
        // A heartbeat ahead of what was applied also asks for a snapshot.
        presence.apply_snapshot("n2", 6, Vec::new());
        assert!(!presence.heard_from("n2", "b", Some(6)));
        assert!(presence.heard_from("n2", "b", Some(7)));
        presence.apply_snapshot(
            "n2",
            7,
            vec![HubSnapshot {
                hub: "h".into(),
                connections: vec![("x".into(), Some("bob".into()))],
                groups: vec![GroupSnapshot {
                    group: "g".into(),
                    connections: 1,
                    users: vec![("bob".into(), 1)],
                }],
            }],
        );
        assert!(presence.is_user_online("h", "bob"));

        // A node restarted under the same name replaces its previous life at once.
        presence.heard_from("n3", "b", None);
        presence.forget_nodes(Duration::MAX, Some(("b", "n3")));
        assert!(!presence.is_user_online("h", "bob"));
        assert_eq!(presence.group("h", "g").connections, 1);
        // A silent node is forgotten.
        presence.apply_snapshot(
            "n3",
            0,
            vec![HubSnapshot {
                hub: "h".into(),
                connections: vec![("y".into(), Some("cat".into()))],
                groups: Vec::new(),
            }],
        );
        assert!(presence.is_user_online("h", "cat"));
        std::thread::sleep(Duration::from_millis(20));
        presence.forget_nodes(Duration::from_millis(10), None);
        assert!(!presence.is_user_online("h", "cat"));
    }
}
