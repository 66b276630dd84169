//! One hub's routing tables on one shard: its sessions, `group -> local members`,
//! `user -> local sessions` and presence watchers. A send becomes a [`Broadcast`]
//! that every shard resolves against its own tables; no table is shared, so no lock is
//! taken on the message path.

use std::rc::Rc;
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};

use crate::api::types::Target;
use crate::fanout::{Broadcast, FrameCache};
use crate::flow::Ticket;
use crate::session::Session;

/// Gives back a hash table's memory once it holds a quarter of what it has room for
/// (a table keeps its largest size otherwise: a connection that joined and left many
/// groups would hold their room for its whole life). A macro: the sets and maps of
/// hashbrown share these methods but no trait.
macro_rules! shrink_if_sparse {
    ($table:expr) => {{
        let table = &mut $table;
        if table.capacity() > 64 && table.len() < table.capacity() / 4 {
            table.shrink_to_fit();
        }
    }};
}

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
        shrink_if_sparse!(self.groups);
        Some(session)
    }

    /// The sessions of `user` here.
    pub fn user_sessions(&self, user: &str) -> Vec<Rc<Session>> {
        self.users
            .get(user)
            .map(|members| members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The connections in `group` here, with their user ids.
    pub fn group_members(&self, group: &str) -> Vec<(String, Option<String>)> {
        self.groups.get(group).map_or_else(Vec::new, |members| {
            members
                .values()
                .map(|s| (s.caller.connection_id.clone(), s.caller.user_id.clone()))
                .collect()
        })
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

    /// Removes the connection from the group; true if it was in it. Memory a session
    /// or the table held for many groups is given back once most are left.
    pub fn leave(&mut self, key: u64, group: &str) -> bool {
        let Some(session) = self.sessions.get(&key) else {
            return false;
        };
        let mut groups = session.groups.borrow_mut();
        if !groups.remove(group) {
            return false;
        }
        shrink_if_sparse!(*groups);
        drop(groups);
        remove_member(&mut self.groups, group, key);
        shrink_if_sparse!(self.groups);
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
            session.enqueue(frames.get(session.kind()), None);
        }
    }

    /// Hands the broadcast's frame to every local recipient of `target`, each once; a
    /// congested recipient keeps `ticket` with the frame (its publisher waits for it).
    /// Returns how many connections it was queued for.
    pub fn deliver(
        &self,
        target: &Target,
        broadcast: &Broadcast,
        ticket: Option<&Arc<Ticket>>,
    ) -> usize {
        let mut frames = FrameCache::new(broadcast);
        let mut count = 0;
        let mut send = |session: &Rc<Session>| {
            if session.enqueue(frames.get(session.kind()), ticket) {
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
            Target::Group(group) => each_named(&self.groups, group, None, &mut send),
            Target::GroupExcept(group, ids) => {
                each_named(&self.groups, group, Some(&keys_of(ids)), &mut send)
            }
            Target::Groups(groups) => union(groups.iter().filter_map(|g| self.groups.get(g)))
                .values()
                .for_each(|session| send(session)),
            Target::User(user) => each_named(&self.users, user, None, &mut send),
            Target::UserExcept(user, ids) => {
                each_named(&self.users, user, Some(&keys_of(ids)), &mut send)
            }
            Target::Users(users) => union(users.iter().filter_map(|u| self.users.get(u)))
                .values()
                .for_each(|session| send(session)),
        }
        count
    }
}

/// Calls `each` for every member of the set `name` (a group's or a user's), but those
/// in `excluded`. Without exclusions, the members are walked as they are (the fan-out
/// path).
fn each_named(
    sets: &HashMap<String, Members>,
    name: &str,
    excluded: Option<&HashSet<u64>>,
    each: &mut impl FnMut(&Rc<Session>),
) {
    let Some(members) = sets.get(name) else {
        return;
    };
    match excluded {
        None => members.values().for_each(each),
        Some(excluded) => except(members, excluded).for_each(each),
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

#[cfg(test)]
mod tests {
    use ringhub_protocol::frame::Framing;
    use ringhub_protocol::{HubMessage, HubProtocol, Value};

    use super::*;
    use crate::api::types::Caller;
    use crate::fanout::FrameKind;
    use crate::metrics::{Metrics, MetricsRef};

    /// A session of `user` (if any) taking `kind` frames, keyed `key`.
    fn session(key: u64, user: Option<&str>, kind: FrameKind) -> Rc<Session> {
        let caller = Rc::new(Caller {
            connection_id: format!("c{key}"),
            hub: "h".into(),
            user_id: user.map(str::to_owned),
            claims: None,
            client_query: None,
        });
        let metrics = Rc::new(MetricsRef(Arc::new(Metrics::new(1)), 0));
        let window = crate::flow::Window::new(1 << 18, None);
        Rc::new(Session::new(
            key,
            caller,
            kind,
            1 << 20,
            window,
            metrics,
            None,
        ))
    }

    const JSON_WS: FrameKind = FrameKind {
        protocol: HubProtocol::Json,
        framing: Framing::WebSocket,
    };

    /// The frames queued for a session, taken out (how many, and their bytes).
    fn taken(session: &Session) -> (u64, Vec<u8>) {
        if session.queued_bytes() == 0 {
            return (0, Vec::new());
        }
        let (mut copied, mut batch) = (Vec::new(), Vec::new());
        match futures_executor::block_on(session.next_batch(&mut copied, &mut batch)) {
            Some(taken) if batch.is_empty() => (taken.frames, copied),
            Some(taken) => (taken.frames, batch.concat()),
            None => (0, Vec::new()),
        }
    }

    /// Five sessions: c0 and c1 of ann, c2 of bob, c3 and c4 anonymous; c0, c2, c3 in
    /// "g", c3 and c4 in "h".
    fn tables() -> (HubTables, Vec<Rc<Session>>) {
        let mut tables = HubTables::default();
        let users = [Some("ann"), Some("ann"), Some("bob"), None, None];
        let sessions: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(key, user)| session(key as u64, *user, JSON_WS))
            .collect();
        for s in &sessions {
            tables.insert(s.clone());
        }
        for (key, group) in [(0, "g"), (2, "g"), (3, "g"), (3, "h"), (4, "h")] {
            assert!(tables.join(key, group));
        }
        (tables, sessions)
    }

    fn receivers(tables: &HubTables, sessions: &[Rc<Session>], target: Target) -> Vec<u64> {
        let broadcast = Broadcast::new(HubMessage::invocation("m", vec![Value::Int(1)]));
        let count = tables.deliver(&target, &broadcast, None);
        let got: Vec<u64> = sessions
            .iter()
            .filter(|s| taken(s).0 == 1)
            .map(|s| s.key)
            .collect();
        assert_eq!(count, got.len(), "{target:?}: the count matches the queues");
        got
    }

    #[test]
    fn every_target_reaches_exactly_its_sessions_once() {
        let (tables, s) = tables();
        let ids = |keys: &[u64]| keys.iter().map(|k| format!("c{k}")).collect::<Vec<_>>();
        assert_eq!(receivers(&tables, &s, Target::All), [0, 1, 2, 3, 4]);
        assert_eq!(
            receivers(&tables, &s, Target::AllExcept(ids(&[1, 3]))),
            [0, 2, 4]
        );
        assert_eq!(receivers(&tables, &s, Target::Group("g".into())), [0, 2, 3]);
        assert_eq!(
            receivers(&tables, &s, Target::GroupExcept("g".into(), ids(&[2]))),
            [0, 3]
        );
        assert_eq!(
            receivers(&tables, &s, Target::Groups(vec!["g".into(), "h".into()])),
            [0, 2, 3, 4],
            "c3 is in both groups and gets one copy"
        );
        assert_eq!(receivers(&tables, &s, Target::User("ann".into())), [0, 1]);
        assert_eq!(
            receivers(&tables, &s, Target::UserExcept("ann".into(), ids(&[0]))),
            [1]
        );
        assert_eq!(
            receivers(
                &tables,
                &s,
                Target::Users(vec!["ann".into(), "bob".into(), "ann".into()])
            ),
            [0, 1, 2]
        );
        assert_eq!(receivers(&tables, &s, Target::Connection("c4".into())), [4]);
        assert_eq!(
            receivers(&tables, &s, Target::Connections(ids(&[1, 1, 9]))),
            [1],
            "duplicates and unknown ids are ignored"
        );
        assert!(receivers(&tables, &s, Target::Group("nobody".into())).is_empty());
    }

    #[test]
    fn leaving_and_removal_update_every_table() {
        let (mut tables, s) = tables();
        assert!(tables.leave(0, "g"));
        assert!(!tables.leave(0, "g"), "not a member any more");
        assert!(!tables.join(2, "g"), "already a member");
        assert_eq!(receivers(&tables, &s, Target::Group("g".into())), [2, 3]);
        let (mut left, mut unwatched) = (Vec::new(), Vec::new());
        assert!(tables.watch(3, "g", true));
        tables.remove(
            3,
            |g| left.push(g.to_owned()),
            |g| unwatched.push(g.to_owned()),
        );
        left.sort();
        assert_eq!(left, ["g", "h"]);
        assert_eq!(unwatched, ["g"]);
        assert_eq!(receivers(&tables, &s, Target::Group("g".into())), [2]);
        assert_eq!(receivers(&tables, &s, Target::Group("h".into())), [4]);
        assert_eq!(tables.key_of("c3"), None);
        assert!(!tables.join(3, "g"), "a removed session joins nothing");
    }

    #[test]
    fn leaving_many_groups_gives_their_memory_back() {
        let (mut tables, s) = tables();
        let names: Vec<String> = (0..5000).map(|i| format!("group-{i}")).collect();
        for name in &names {
            tables.join(4, name);
        }
        let grown = (s[4].groups.borrow().capacity(), tables.groups.capacity());
        assert!(grown.0 >= 5000 && grown.1 >= 5000);
        for name in &names {
            tables.leave(4, name);
        }
        let after = (s[4].groups.borrow().capacity(), tables.groups.capacity());
        assert!(
            after.0 < 100 && after.1 < 100,
            "capacity {grown:?} -> {after:?}"
        );
        assert_eq!(receivers(&tables, &s, Target::Group("h".into())), [3, 4]);
    }

    #[test]
    fn each_session_gets_the_frame_of_its_protocol_and_framing() {
        let mut tables = HubTables::default();
        let kinds = [
            JSON_WS,
            FrameKind {
                protocol: HubProtocol::Json,
                framing: Framing::ServerSentEvents,
            },
            FrameKind {
                protocol: HubProtocol::MessagePack,
                framing: Framing::Raw,
            },
        ];
        let sessions: Vec<_> = kinds
            .iter()
            .enumerate()
            .map(|(key, kind)| session(key as u64, None, *kind))
            .collect();
        for s in &sessions {
            tables.insert(s.clone());
        }
        let message = HubMessage::invocation("m", vec![Value::Int(1)]);
        tables.deliver(&Target::All, &Broadcast::new(message.clone()), None);
        for (session, kind) in sessions.iter().zip(kinds) {
            let expected =
                ringhub_protocol::frame::encode_framed(kind.protocol, kind.framing, &message);
            assert_eq!(taken(session).1, expected.to_vec(), "{kind:?}");
        }
    }
}
