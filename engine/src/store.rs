//! Durable user -> group membership (contract section 5): a user's durable groups are
//! joined by each of its connections, now and after restarts.
//!
//! [`MembershipStore`] is the embedding API's seam (a Redis store can back it for
//! several nodes); [`RedbStore`] is the single-node default. redb was chosen because it
//! is pure Rust (no C toolchain or background threads), crash-safe by design
//! (copy-on-write B-trees with checksummed commits, no repair step after a crash), and
//! keeps everything in one file under `--data`. The engine calls the store from its own
//! thread for writes (a commit waits for fsync) and reads at connect time, when a
//! read transaction costs microseconds.

use std::path::Path;
use std::sync::Mutex;

use hashbrown::{HashMap, HashSet};
use redb::{Database, MultimapTableDefinition};
use thiserror::Error;

/// A user's durable groups as of a version of the store. Versions grow with every
/// change of the user's membership, so that changes made concurrently (a REST `PUT`
/// and a `DELETE` through two nodes) reach live connections in the store's order: a
/// connection takes on a state only if it is at least as new as the one it has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableGroups {
    /// How new `groups` is: they are at least as new as this version, and a later
    /// change gets a higher one.
    pub version: u64,
    /// The user's durable groups, as read at (or after) that version.
    pub groups: Vec<String>,
}

/// A store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The `--data` directory could not be made (permissions, a file in the way).
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// Why not.
        source: std::io::Error,
    },
    /// The database failed (I/O, corruption, a full disk); redb's or the store's text.
    #[error("membership store: {0}")]
    Database(String),
    /// Another process holds the file: two nodes on one `--data`, which redb's lock
    /// refuses rather than let them overwrite each other.
    #[error("the membership store {path} is open in another process (another ringhub on the same --data?): give each node its own --data directory (the nodes of a cluster share durable membership through Redis)")]
    InUse {
        /// The database file.
        path: String,
    },
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StoreError {
            fn from(e: $error) -> Self {
                StoreError::from(redb::Error::from(e))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::UpgradeError
);

/// Where durable memberships live. Calls may block (disk, network): the engine makes
/// writes from a thread of its own, never from a shard.
pub trait MembershipStore: Send + Sync + 'static {
    /// The user's durable groups in `hub`, sorted.
    fn user_groups(&self, hub: &str, user: &str) -> Result<Vec<String>, StoreError>;
    /// Adds the user to the group; done once it returns (committed).
    fn add(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError>;
    /// Removes the user from the group (not being in it is not an error).
    fn remove(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError>;
}

/// The expiry of durable memberships given a time to live (Azure's `ttl`): the newest
/// grant of each (hub, user, group) by number, so that a timer set for an older grant
/// finds itself superseded (a later grant without ttl, a removal) and does nothing.
/// Kept in memory by the node that took the grant.
#[derive(Default)]
pub struct MembershipExpiry {
    grants: Mutex<HashMap<(String, String, String), u64>>,
    next: std::sync::atomic::AtomicU64,
}

impl MembershipExpiry {
    /// A new grant of the membership supersedes every earlier one; its number.
    pub fn grant(&self, hub: &str, user: &str, group: &str) -> u64 {
        let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.insert((hub.to_owned(), user.to_owned(), group.to_owned()), number);
        number
    }

    /// The membership was changed without a time to live (added for good, or removed):
    /// no earlier grant's expiry is due any more.
    pub fn revoke(&self, hub: &str, user: &str, group: &str) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.remove(&(hub.to_owned(), user.to_owned(), group.to_owned()));
    }

    /// Whether grant `number` is still the newest (its expiry is due); forgets it then.
    pub fn expire(&self, hub: &str, user: &str, group: &str, number: u64) -> bool {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let key = (hub.to_owned(), user.to_owned(), group.to_owned());
        if grants.get(&key) == Some(&number) {
            grants.remove(&key);
            true
        } else {
            false
        }
    }
}

/// (hub, user) -> group.
const MEMBERSHIP: MultimapTableDefinition<(&str, &str), &str> =
    MultimapTableDefinition::new("user_groups");

/// The default store: one redb file, `membership.redb`, in the data directory.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) `membership.redb` in `dir`, creating the directory too.
    /// Fails with [`StoreError::InUse`] when another process has it open.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("membership.redb");
        let in_use = |error: redb::DatabaseError| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.display().to_string(),
            },
            other => other.into(),
        };
        // redb 3 reads only the v3 file format, which redb 2 writes only when asked: a
        // new store is written in it, an older one upgraded now, so that durable
        // membership survives the next major version.
        let db = if path.exists() {
            let mut db = Database::create(&path).map_err(in_use)?;
            if db.upgrade()? {
                tracing::info!(path = %dir.display(), "membership store upgraded to redb's v3 file format");
            }
            db
        } else {
            Database::builder()
                .create_with_file_format_v3(true)
                .create(&path)
                .map_err(in_use)?
        };
        // Create the table once, so that reads never find it missing.
        let txn = db.begin_write()?;
        txn.open_multimap_table(MEMBERSHIP)?;
        txn.commit()?;
        Ok(RedbStore { db })
    }
}

impl MembershipStore for RedbStore {
    fn user_groups(&self, hub: &str, user: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_multimap_table(MEMBERSHIP)?;
        let mut groups = Vec::new();
        for group in table.get((hub, user))? {
            groups.push(group?.value().to_owned());
        }
        Ok(groups)
    }

    fn add(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_multimap_table(MEMBERSHIP)?
            .insert((hub, user), group)?;
        txn.commit()?;
        Ok(())
    }

    fn remove(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_multimap_table(MEMBERSHIP)?
            .remove((hub, user), group)?;
        txn.commit()?;
        Ok(())
    }
}

/// A store in memory, gone with the process: for tests and servers that keep durable
/// membership elsewhere.
#[derive(Default)]
pub struct MemoryStore {
    groups: Mutex<HashMap<(String, String), HashSet<String>>>,
}

impl MembershipStore for MemoryStore {
    fn user_groups(&self, hub: &str, user: &str) -> Result<Vec<String>, StoreError> {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<String> = groups
            .get(&(hub.to_owned(), user.to_owned()))
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default();
        list.sort_unstable();
        Ok(list)
    }

    fn add(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .entry((hub.to_owned(), user.to_owned()))
            .or_default()
            .insert(group.to_owned());
        Ok(())
    }

    fn remove(&self, hub: &str, user: &str, group: &str) -> Result<(), StoreError> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = groups.get_mut(&(hub.to_owned(), user.to_owned())) {
            set.remove(group);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn MembershipStore) {
        store.add("h", "ann", "ward:2").unwrap();
        store.add("h", "ann", "ward:1").unwrap();
        store.add("h", "ann", "ward:1").unwrap();
        store.add("other", "ann", "x").unwrap();
        assert_eq!(store.user_groups("h", "ann").unwrap(), ["ward:1", "ward:2"]);
        store.remove("h", "ann", "ward:2").unwrap();
        store.remove("h", "ann", "never").unwrap();
        assert_eq!(store.user_groups("h", "ann").unwrap(), ["ward:1"]);
        assert!(store.user_groups("h", "bob").unwrap().is_empty());
    }

    #[test]
    fn memory_store_keeps_sets() {
        exercise(&MemoryStore::default());
    }

    #[test]
    fn redb_store_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("ringhub-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        exercise(&RedbStore::open(&dir).unwrap());
        let reopened = RedbStore::open(&dir).unwrap();
        assert_eq!(reopened.user_groups("h", "ann").unwrap(), ["ward:1"]);
        assert_eq!(reopened.user_groups("other", "ann").unwrap(), ["x"]);
        drop(reopened);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_store_is_written_in_the_v3_format_and_a_second_opener_is_told_why_it_cannot() {
        let dir = std::env::temp_dir().join(format!("ringhub-store-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = RedbStore::open(&dir).unwrap();
        let error = RedbStore::open(&dir).err().expect("the store is open");
        assert!(
            matches!(&error, StoreError::InUse { path } if path.ends_with("membership.redb")),
            "{error}"
        );
        assert!(
            error.to_string().contains("its own --data directory"),
            "{error}"
        );
        drop(store);
        let mut db = Database::create(dir.join("membership.redb")).unwrap();
        assert!(
            !db.upgrade().unwrap(),
            "created in the v3 format: nothing to upgrade"
        );
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_in_the_old_file_format_opens_upgraded_with_its_memberships() {
        let dir = std::env::temp_dir().join(format!("ringhub-store-v2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("membership.redb");
        {
            // What redb 2 writes by default (and what stores of earlier releases are).
            let db = Database::builder()
                .create_with_file_format_v3(false)
                .create(&path)
                .unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_multimap_table(MEMBERSHIP)
                .unwrap()
                .insert(("h", "ann"), "ward:7")
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&dir).unwrap();
        assert_eq!(store.user_groups("h", "ann").unwrap(), ["ward:7"]);
        drop(store);
        // Upgraded in place: a second open has nothing left to upgrade.
        let mut db = Database::create(&path).unwrap();
        assert!(!db.upgrade().unwrap(), "already in the v3 format");
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
