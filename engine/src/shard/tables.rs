//! One hub's routing tables on one shard: its sessions, `group -> local members`,
//! `user -> local sessions` and presence watchers. A send becomes a [`Broadcast`]
//! that every shard resolves against its own tables; no table is shared, so no lock is
//! taken on the message path.

use std::rc::Rc;

use hashbrown::{HashMap, HashSet};

use crate::api::types::Target;
use crate::fanout::{Broadcast, FrameCache};
use crate::session::Session;

/// One hub's tables on one shard. Connections are keyed by a shard-local number.
#[derive(Default)]
pub struct HubTables {
    pub sessions: HashMap<u64, Rc<Session>>,
    by_id: HashMap<String, u64>,
    groups: HashMap<String, Members>,
    users: HashMap<String, Members>,
    /// group -> local connections watching its presence.
    watchers: HashMap<String, Members>,
}

/// A set of local sessions by key, holding the sessions themselves: a fan-out
/// walks the set without a lookup per recipient in the connection table (a cache miss
/// each with 10,000 connections).
type Members = HashMap<u64, Rc<Session>>;

impl HubTables {
    pub fn insert(&mut self, session: Rc<Session>) {
        self.by_id
            .insert(session.caller.connection_id.clone(), session.key);
        if let Some(user) = &session.caller.user_id {
            self.users
                .entry(user.clone())
                .or_default()
                .insert(session.key, session.clone());
        }
        self.sessions.insert(session.key, session);
    }

    /// Removes a connection from every table, leaving its groups and its watches; calls
    /// `left(group)` for each group it was in and `unwatched(group)` for each watch.
    pub fn remove(
        &mut self,
        key: u64,
        mut left: impl FnMut(&str),
        mut unwatched: impl FnMut(&str),
    ) -> Option<Rc<Session>> {
        let session = self.sessions.remove(&key)?;
        self.by_id.remove(&session.caller.connection_id);
        if let Some(user) = &session.caller.user_id {
            remove_member(&mut self.users, user, key);
        }
        for group in session.groups.borrow_mut().drain() {
            remove_member(&mut self.groups, &group, key);
            left(&group);
        }
        for group in session.watching.borrow_mut().drain() {
            remove_member(&mut self.watchers, &group, key);
            unwatched(&group);
        }
        Some(session)
    }

    pub fn key_of(&self, connection_id: &str) -> Option<u64> {
        self.by_id.get(connection_id).copied()
    }

    pub fn session(&self, key: u64) -> Option<&Rc<Session>> {
        self.sessions.get(&key)
    }

    /// Adds the connection to the group; true if it was not in it.
    pub fn join(&mut self, key: u64, group: &str) -> bool {
        let Some(session) = self.sessions.get(&key) else {
            return false;
        };
        if !session.groups.borrow_mut().insert(group.to_owned()) {
            return false;
        }
        let session = session.clone();
        self.groups
            .entry_ref(group)
            .or_default()
            .insert(key, session);
        true
    }

    /// Removes the connection from the group; true if it was in it.
    pub fn leave(&mut self, key: u64, group: &str) -> bool {
        let Some(session) = self.sessions.get(&key) else {
            return false;
        };
        if !session.groups.borrow_mut().remove(group) {
            return false;
        }
        remove_member(&mut self.groups, group, key);
        true
    }

    /// Starts or stops the connection's watch of a group; true if that changed anything.
    pub fn watch(&mut self, key: u64, group: &str, watch: bool) -> bool {
        let Some(session) = self.sessions.get(&key) else {
            return false;
        };
        if watch {
            if !session.watching.borrow_mut().insert(group.to_owned()) {
                return false;
            }
            let session = session.clone();
            self.watchers
                .entry_ref(group)
                .or_default()
                .insert(key, session);
        } else {
            if !session.watching.borrow_mut().remove(group) {
                return false;
            }
            remove_member(&mut self.watchers, group, key);
        }
        true
    }

    /// Hands the broadcast's frame to every local watcher of `group`.
    pub fn notify_watchers(&self, group: &str, broadcast: &Broadcast) {
        let Some(watchers) = self.watchers.get(group) else {
            return;
        };
        let mut frames = FrameCache::new(broadcast);
        for session in watchers.values() {
            session.enqueue(frames.get(session.kind()));
        }
    }

    /// Hands the broadcast's frame to every local recipient of `target`, each once.
    /// Returns how many connections it was queued for.
    pub fn deliver(&self, target: &Target, broadcast: &Broadcast) -> usize {
        let mut frames = FrameCache::new(broadcast);
        let mut count = 0;
        let mut send = |session: &Rc<Session>| {
            if session.enqueue(frames.get(session.kind())) {
                count += 1;
            }
        };
        let keys_of = |ids: &[String]| -> HashSet<u64> {
            ids.iter().filter_map(|id| self.key_of(id)).collect()
        };
        match target {
            Target::All => self.sessions.values().for_each(&mut send),
            Target::AllExcept(ids) => except(&self.sessions, &keys_of(ids)).for_each(&mut send),
            Target::Connection(id) => self
                .key_of(id)
                .and_then(|key| self.sessions.get(&key))
                .into_iter()
                .for_each(&mut send),
            Target::Connections(ids) => keys_of(ids)
                .iter()
                .filter_map(|key| self.sessions.get(key))
                .for_each(&mut send),
            Target::Group(group) => {
                if let Some(members) = self.groups.get(group) {
                    members.values().for_each(&mut send);
                }
            }
            Target::GroupExcept(group, ids) => {
                if let Some(members) = self.groups.get(group) {
                    except(members, &keys_of(ids)).for_each(&mut send);
                }
            }
            Target::Groups(groups) => union(groups.iter().filter_map(|g| self.groups.get(g)))
                .values()
                .for_each(|session| send(session)),
            Target::User(user) => {
                if let Some(sessions) = self.users.get(user) {
                    sessions.values().for_each(&mut send);
                }
            }
            Target::Users(users) => union(users.iter().filter_map(|u| self.users.get(u)))
                .values()
                .for_each(|session| send(session)),
        }
        count
    }
}

/// The members whose keys are not in `excluded`.
fn except<'a>(
    members: &'a Members,
    excluded: &'a HashSet<u64>,
) -> impl Iterator<Item = &'a Rc<Session>> {
    members
        .iter()
        .filter(|(key, _)| !excluded.contains(*key))
        .map(|(_, session)| session)
}

/// Removes `key` from the set under `name`, dropping the set once empty.
fn remove_member(sets: &mut HashMap<String, Members>, name: &str, key: u64) {
    if let Some(set) = sets.get_mut(name) {
        set.remove(&key);
        if set.is_empty() {
            sets.remove(name);
        }
    }
}

/// The union of several member sets, so that a connection in two of them gets one copy.
fn union<'a>(sets: impl Iterator<Item = &'a Members>) -> HashMap<u64, &'a Rc<Session>> {
    let mut all = HashMap::new();
    for set in sets {
        all.extend(set.iter().map(|(key, session)| (*key, session)));
    }
    all
}
