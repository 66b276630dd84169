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
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use ringhub_protocol::Value;

/// How often a shard tells its watchers about groups whose counts changed.
pub const PRESENCE_INTERVAL: Duration = Duration::from_millis(100);

/// The method watchers receive (contract section 4, `WatchPresence`).
pub const PRESENCE_CHANGED: &str = "PresenceChanged";

/// A group's presence: its connections and the distinct users among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPresence {
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
    /// shard -> how many of its connections watch the group.
    watchers: HashMap<usize, usize>,
}

impl GroupEntry {
    fn presence(&self) -> GroupPresence {
        let mut user_ids: Vec<String> = self.users.keys().cloned().collect();
        user_ids.sort_unstable();
        GroupPresence {
            connections: self.connections,
            user_ids,
        }
    }

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

#[derive(Default)]
struct Registry {
    hubs: HashMap<String, HubEntry>,
    /// Per shard: the (hub, group) pairs whose counts changed since it last looked.
    changed: Vec<HashSet<(String, String)>>,
    /// Groups with at least one member, over all hubs (the `ringhub_groups` gauge).
    nonempty_groups: usize,
}

/// The registry (one per server).
pub struct Presence {
    registry: Mutex<Registry>,
    /// Per shard: whether it has changes to collect (checked without the lock).
    pending: Vec<AtomicBool>,
}

impl Presence {
    pub fn new(shards: usize) -> Presence {
        Presence {
            registry: Mutex::new(Registry {
                changed: vec![HashSet::new(); shards],
                ..Registry::default()
            }),
            pending: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Every update below completes or changes nothing, so a poisoned lock (a panic
        // elsewhere while holding it) still guards consistent tables.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connected(&self, hub: &str, connection_id: &str, user: Option<&str>, shard: usize) {
        let mut registry = self.lock();
        let entry = registry.hubs.entry_ref(hub).or_default();
        entry.connections.insert(
            connection_id.to_owned(),
            ConnectionEntry {
                shard,
                user: user.map(str::to_owned),
            },
        );
        if let Some(user) = user {
            entry
                .users
                .entry_ref(user)
                .or_default()
                .insert(connection_id.to_owned());
        }
    }

    /// Forgets a connection; its groups must have been left (see [`Presence::left`]).
    pub fn disconnected(&self, hub: &str, connection_id: &str) {
        let mut registry = self.lock();
        let Some(entry) = registry.hubs.get_mut(hub) else {
            return;
        };
        if let Some(connection) = entry.connections.remove(connection_id) {
            if let Some(user) = connection.user {
                if let Some(ids) = entry.users.get_mut(&user) {
                    ids.remove(connection_id);
                    if ids.is_empty() {
                        entry.users.remove(&user);
                    }
                }
            }
        }
        if entry.connections.is_empty() && entry.groups.is_empty() {
            registry.hubs.remove(hub);
        }
    }

    /// A connection (of `user`, if any) joined `group`.
    pub fn joined(&self, hub: &str, group: &str, user: Option<&str>) {
        let mut registry = self.lock();
        let registry = &mut *registry;
        let hub_entry = registry.hubs.entry_ref(hub).or_default();
        let entry = hub_entry.groups.entry_ref(group).or_default();
        if entry.connections == 0 {
            registry.nonempty_groups += 1;
        }
        entry.connections += 1;
        if let Some(user) = user {
            *entry.users.entry_ref(user).or_default() += 1;
        }
        mark_changed(&mut registry.changed, &self.pending, entry, hub, group);
    }

    /// A connection (of `user`, if any) left `group`.
    pub fn left(&self, hub: &str, group: &str, user: Option<&str>) {
        let mut registry = self.lock();
        let registry = &mut *registry;
        let Some(hub_entry) = registry.hubs.get_mut(hub) else {
            return;
        };
        let Some(entry) = hub_entry.groups.get_mut(group) else {
            return;
        };
        // Only a member leaves (the shard tables say so); an entry kept alive by its
        // watchers alone has no connection to take away.
        if entry.connections == 0 {
            return;
        }
        entry.connections -= 1;
        if entry.connections == 0 {
            registry.nonempty_groups -= 1;
        }
        if let Some(user) = user {
            if let Some(count) = entry.users.get_mut(user) {
                *count -= 1;
                if *count == 0 {
                    entry.users.remove(user);
                }
            }
        }
        mark_changed(&mut registry.changed, &self.pending, entry, hub, group);
        if entry.is_unused() {
            hub_entry.groups.remove(group);
        }
    }

    /// A connection on `shard` starts (or stops) watching `group`.
    pub fn watch(&self, hub: &str, group: &str, shard: usize, watch: bool) {
        let mut registry = self.lock();
        let hub_entry = registry.hubs.entry_ref(hub).or_default();
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

    pub fn group(&self, hub: &str, group: &str) -> GroupPresence {
        let registry = self.lock();
        registry
            .hubs
            .get(hub)
            .and_then(|h| h.groups.get(group))
            .map_or_else(GroupPresence::default, GroupEntry::presence)
    }

    /// The user's connection ids (empty when offline), sorted.
    pub fn user_connections(&self, hub: &str, user: &str) -> Vec<String> {
        let registry = self.lock();
        let mut ids: Vec<String> = registry
            .hubs
            .get(hub)
            .and_then(|h| h.users.get(user))
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    pub fn is_user_online(&self, hub: &str, user: &str) -> bool {
        let registry = self.lock();
        registry
            .hubs
            .get(hub)
            .is_some_and(|h| h.users.contains_key(user))
    }

    /// The shard that holds a connection, if it is connected.
    pub fn shard_of(&self, hub: &str, connection_id: &str) -> Option<usize> {
        let registry = self.lock();
        registry
            .hubs
            .get(hub)?
            .connections
            .get(connection_id)
            .map(|c| c.shard)
    }

    /// The groups with members, over all hubs and shards.
    pub fn nonempty_groups(&self) -> usize {
        self.lock().nonempty_groups
    }

    /// Takes the groups watched on `shard` whose counts changed, with their counts now.
    pub fn take_changes(&self, shard: usize) -> Vec<(String, String, GroupPresence)> {
        if !self.pending[shard].swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut registry = self.lock();
        let changed = std::mem::take(&mut registry.changed[shard]);
        changed
            .into_iter()
            .map(|(hub, group)| {
                let presence = registry
                    .hubs
                    .get(&hub)
                    .and_then(|h| h.groups.get(&group))
                    .map_or_else(GroupPresence::default, GroupEntry::presence);
                (hub, group, presence)
            })
            .collect()
    }
}

/// Notes, for every shard that watches the group, that its counts changed.
fn mark_changed(
    changed: &mut [HashSet<(String, String)>],
    pending: &[AtomicBool],
    entry: &GroupEntry,
    hub: &str,
    group: &str,
) {
    for &shard in entry.watchers.keys() {
        changed[shard].insert((hub.to_owned(), group.to_owned()));
        pending[shard].store(true, Ordering::Release);
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
}
