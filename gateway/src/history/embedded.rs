//! The default store: one redb file. Every append is its own write transaction committed with
//! redb's default (immediate, fsync'd) durability before it is acknowledged; the same
//! transaction drops the user's oldest events beyond `max_history`.

use super::{HistoryStore, StoreError, StoredEvent};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

/// (user, sequence number) -> (item id, timestamp ms). Keys sort by user then sequence, so a
/// user's history is one range scan and the next sequence number is the last key's plus one.
/// Events are only ever removed from the oldest end, so a user's sequence numbers stay
/// contiguous and the history's length is the last key's minus the first key's plus one.
const EVENTS: TableDefinition<(&str, u64), (&str, i64)> = TableDefinition::new("events");
/// Marker that the store was seeded from the data set.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb-backed [`HistoryStore`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Events kept per user (the newest).
    max_history: u64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the database file, creating its directory if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(EVENTS).map_err(unavailable)?;
        tx.open_table(META).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Self { db: Arc::new(db), max_history: u64::MAX })
    }

    /// Keeps at most `max_history` events per user (the newest): each append drops the oldest
    /// beyond it in its own write transaction. Unlimited unless set.
    pub fn with_max_history(mut self, max_history: usize) -> Self {
        self.max_history = (max_history as u64).max(1);
        self
    }

    /// Runs blocking redb work off the async runtime.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(unavailable)?
    }
}

/// Appends `events` to the user's history in `tx` and drops its oldest events beyond
/// `max_history`; returns the new length.
fn append_in(tx: &redb::WriteTransaction, user: &str, events: &[StoredEvent], max_history: u64) -> Result<u32, StoreError> {
    let mut table = tx.open_table(EVENTS).map_err(unavailable)?;
    // The first and the next free sequence numbers (0, 0 for a new user).
    let (first, next) = {
        let mut range = table.range((user, 0)..=(user, u64::MAX)).map_err(unavailable)?;
        let first = range.next().transpose().map_err(unavailable)?.map(|(k, _)| k.value().1);
        let last = range.next_back().transpose().map_err(unavailable)?.map(|(k, _)| k.value().1);
        match (first, last) {
            (Some(f), Some(l)) => (f, l + 1),
            (Some(f), None) => (f, f + 1),
            _ => (0, 0),
        }
    };
    for (i, e) in events.iter().enumerate() {
        table.insert((user, next + i as u64), (e.item_id.as_str(), e.timestamp_ms)).map_err(unavailable)?;
    }
    let end = next + events.len() as u64;
    let keep_from = end.saturating_sub(max_history).max(first);
    for seq in first..keep_from {
        table.remove((user, seq)).map_err(unavailable)?;
    }
    Ok((end - keep_from).min(u32::MAX as u64) as u32)
}

impl HistoryStore for EmbeddedStore {
    async fn append(&self, user: &str, events: &[StoredEvent]) -> Result<u32, StoreError> {
        let (user, events, max_history) = (user.to_string(), events.to_vec(), self.max_history);
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            let len = append_in(&tx, &user, &events, max_history)?;
            tx.commit().map_err(unavailable)?;
            Ok(len)
        })
        .await
    }

    async fn read(&self, user: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let user = user.to_string();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let table = tx.open_table(EVENTS).map_err(unavailable)?;
            let range = table.range((user.as_str(), 0)..=(user.as_str(), u64::MAX)).map_err(unavailable)?;
            range
                .map(|entry| {
                    let (_, v) = entry.map_err(unavailable)?;
                    let (item, ts) = v.value();
                    Ok(StoredEvent { item_id: item.to_string(), timestamp_ms: ts })
                })
                .collect()
        })
        .await
    }

    async fn seed_once(&self, histories: Vec<(String, Vec<StoredEvent>)>) -> Result<bool, StoreError> {
        let max_history = self.max_history;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut meta = tx.open_table(META).map_err(unavailable)?;
                if meta.get("seeded").map_err(unavailable)?.is_some() {
                    return Ok(false);
                }
                meta.insert("seeded", 1).map_err(unavailable)?;
            }
            // As the Redis store does: a user who already has a history (appended before the
            // store was seeded) keeps it as it is.
            for (user, events) in &histories {
                let range = (user.as_str(), 0)..=(user.as_str(), u64::MAX);
                let known = tx.open_table(EVENTS).map_err(unavailable)?.range(range).map_err(unavailable)?.next().is_some();
                if !known {
                    append_in(&tx, user, events, max_history)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| db.begin_read().map(|_| ()).map_err(unavailable)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(item: &str, ts: i64) -> StoredEvent {
        StoredEvent { item_id: item.into(), timestamp_ms: ts }
    }

    #[tokio::test]
    async fn appends_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            assert_eq!(store.append("u1", &[ev("a", 1), ev("b", 2)]).await.unwrap(), 2);
            assert_eq!(store.append("u1", &[ev("c", 3)]).await.unwrap(), 3);
            assert_eq!(store.append("u10", &[ev("z", 9)]).await.unwrap(), 1, "prefix-sharing user ids stay apart");
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.read("u1").await.unwrap(), vec![ev("a", 1), ev("b", 2), ev("c", 3)]);
        assert_eq!(store.read("u10").await.unwrap(), vec![ev("z", 9)]);
        assert!(store.read("nobody").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn seeds_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("h.redb")).unwrap();
        assert!(store.seed_once(vec![("u".into(), vec![ev("a", 1)])]).await.unwrap());
        assert!(!store.seed_once(vec![("u".into(), vec![ev("b", 2)])]).await.unwrap());
        assert_eq!(store.read("u").await.unwrap(), vec![ev("a", 1)]);

        // Data but no marker (appends before seeding was turned on): seeded, and the users who
        // already have a history keep it as it is.
        let store = EmbeddedStore::open(&dir.path().join("h2.redb")).unwrap();
        store.append("live", &[ev("x", 9)]).await.unwrap();
        let seed = vec![("live".to_string(), vec![ev("a", 1)]), ("new".to_string(), vec![ev("b", 2)])];
        assert!(store.seed_once(seed).await.unwrap());
        assert_eq!(store.read("live").await.unwrap(), vec![ev("x", 9)]);
        assert_eq!(store.read("new").await.unwrap(), vec![ev("b", 2)]);
    }

    #[tokio::test]
    async fn keeps_the_newest_max_history_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.redb");
        let store = EmbeddedStore::open(&path).unwrap().with_max_history(3);
        assert_eq!(store.append("u", &[ev("a", 1), ev("b", 2)]).await.unwrap(), 2);
        assert_eq!(store.append("u", &[ev("c", 3), ev("d", 4)]).await.unwrap(), 3, "the length after trimming");
        assert_eq!(store.read("u").await.unwrap(), vec![ev("b", 2), ev("c", 3), ev("d", 4)]);
        assert_eq!(store.append("u", &[ev("e", 5)]).await.unwrap(), 3);
        assert_eq!(store.read("u").await.unwrap(), vec![ev("c", 3), ev("d", 4), ev("e", 5)]);
        // One append longer than the cap keeps its own newest events.
        let many: Vec<StoredEvent> = (10..15).map(|i| ev(&i.to_string(), i)).collect();
        assert_eq!(store.append("u", &many).await.unwrap(), 3);
        assert_eq!(store.read("u").await.unwrap(), many[2..].to_vec());
        assert_eq!(store.append("u1", &[ev("z", 9)]).await.unwrap(), 1, "other users are untouched");
        assert_eq!(store.read("u1").await.unwrap(), vec![ev("z", 9)]);
        drop(store);

        // A history stored longer than the cap (an older store, or a lower cap) is cut back to
        // it by its next append; seeding is capped too.
        let big: Vec<StoredEvent> = (0..6).map(|i| ev(&i.to_string(), i)).collect();
        EmbeddedStore::open(&path).unwrap().append("long", &big).await.unwrap();
        let store = EmbeddedStore::open(&path).unwrap().with_max_history(2);
        assert_eq!(store.read("long").await.unwrap().len(), 6);
        assert_eq!(store.append("long", &[ev("x", 7)]).await.unwrap(), 2);
        assert_eq!(store.read("long").await.unwrap(), vec![ev("5", 5), ev("x", 7)]);
        assert!(store.seed_once(vec![("s".into(), big.clone())]).await.unwrap());
        assert_eq!(store.read("s").await.unwrap(), big[4..].to_vec());
    }
}
