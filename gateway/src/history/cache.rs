//! A bounded, expiring cache of users' histories in front of a [`HistoryStore`] (not to be
//! confused with the ranker's `history_cache`, which holds attention state for a history's
//! prompt tokens).
//!
//! Entries expire after a TTL because other gateway replicas may append to the same user
//! through a shared store; this replica's own appends invalidate its entry at once.

use super::{HistoryStore, StoreError, StoredEvent};
use dashmap::DashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Entry {
    history: Arc<CachedHistory>,
    loaded: Instant,
}

/// A user's history as the cache holds it: the events, plus their items' dense catalog indices
/// resolved once when the entry is loaded, so that a Recommend for a cached user sends them to
/// the retriever without a hash lookup per item (those lookups were ~10 % of the gateway's CPU).
#[derive(Debug, Default, PartialEq)]
pub struct CachedHistory {
    /// Oldest first.
    pub events: Vec<StoredEvent>,
    /// One per event; None when an item is not in the catalog (or the cache has no resolver).
    pub indices: Option<Vec<u32>>,
}

/// External item id -> dense catalog index.
type Resolver = Arc<dyn Fn(&str) -> Option<u32> + Send + Sync>;

/// How many entries to look at when evicting: an approximate LRU (oldest load wins), as Redis
/// does, instead of a global order that every read would have to lock.
const EVICTION_SAMPLE: usize = 8;

/// Histories cached per user.
pub struct UserHistoryCache<S> {
    store: S,
    entries: DashMap<String, Entry>,
    capacity: usize,
    ttl: Duration,
    resolve: Option<Resolver>,
}

/// Where a history came from, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Served from the cache.
    Cache,
    /// Read from the store.
    Store,
}

impl<S: HistoryStore> UserHistoryCache<S> {
    /// Wraps `store` with at most `capacity` users cached for `ttl` each.
    pub fn new(store: S, capacity: usize, ttl: Duration) -> Self {
        Self { store, entries: DashMap::new(), capacity: capacity.max(1), ttl, resolve: None }
    }

    /// Resolves each loaded history's items to dense catalog indices with `resolve`.
    pub fn with_resolver(mut self, resolve: impl Fn(&str) -> Option<u32> + Send + Sync + 'static) -> Self {
        self.resolve = Some(Arc::new(resolve));
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The user's history, from the cache when fresh. When the store is down, a stale cached
    /// entry is still served (reads keep working; writes are refused by `append`).
    pub async fn read(&self, user: &str) -> Result<(Arc<CachedHistory>, Source), StoreError> {
        if let Some(e) = self.entries.get(user) {
            if e.loaded.elapsed() < self.ttl {
                return Ok((e.history.clone(), Source::Cache));
            }
        }
        match self.store.read(user).await {
            Ok(events) => {
                let indices = self.resolve.as_ref().and_then(|resolve| events.iter().map(|e| resolve(&e.item_id)).collect());
                let history = Arc::new(CachedHistory { events, indices });
                self.insert(user, history.clone());
                Ok((history, Source::Store))
            }
            Err(err) => match self.entries.get(user) {
                Some(stale) => {
                    tracing::warn!(%err, user, "history store failed; serving a stale cached history");
                    Ok((stale.history.clone(), Source::Cache))
                }
                None => Err(err),
            },
        }
    }

    /// Appends durably, then drops the cached entry so the next read sees the append.
    pub async fn append(&self, user: &str, events: &[StoredEvent]) -> Result<u32, StoreError> {
        let len = self.store.append(user, events).await?;
        self.entries.remove(user);
        Ok(len)
    }

    /// Number of cached users.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&self, user: &str, history: Arc<CachedHistory>) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(user) {
            let oldest = self
                .entries
                .iter()
                .take(EVICTION_SAMPLE)
                .min_by_key(|e| e.loaded)
                .map(|e| e.key().clone());
            if let Some(key) = oldest {
                self.entries.remove(&key);
            }
        }
        self.entries.insert(user.to_string(), Entry { history, loaded: Instant::now() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// An in-memory store that counts reads and can be switched off.
    #[derive(Default)]
    struct Counting {
        data: Mutex<std::collections::HashMap<String, Vec<StoredEvent>>>,
        reads: AtomicUsize,
        down: AtomicBool,
    }

    impl HistoryStore for Arc<Counting> {
        async fn append(&self, user: &str, events: &[StoredEvent]) -> Result<u32, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            let mut d = self.data.lock().unwrap();
            let h = d.entry(user.into()).or_default();
            h.extend_from_slice(events);
            Ok(h.len() as u32)
        }
        async fn read(&self, user: &str) -> Result<Vec<StoredEvent>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(self.data.lock().unwrap().get(user).cloned().unwrap_or_default())
        }
        async fn seed_once(&self, _: Vec<(String, Vec<StoredEvent>)>) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn ev(item: &str) -> StoredEvent {
        StoredEvent { item_id: item.into(), timestamp_ms: 0 }
    }

    #[tokio::test]
    async fn caches_reads_and_invalidates_on_append() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store.clone(), 10, Duration::from_secs(60));
        cache.append("u", &[ev("a")]).await.unwrap();
        assert_eq!(cache.read("u").await.unwrap().1, Source::Store);
        assert_eq!(cache.read("u").await.unwrap().1, Source::Cache);
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        cache.append("u", &[ev("b")]).await.unwrap();
        let (history, source) = cache.read("u").await.unwrap();
        assert_eq!((history.events.len(), source), (2, Source::Store), "append must invalidate");
        assert_eq!(history.indices, None, "no resolver, no indices");
    }

    #[tokio::test]
    async fn indices_are_resolved_once_at_load_and_absent_when_an_item_is_unknown() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store.clone(), 10, Duration::from_secs(60)).with_resolver(|id| id.parse().ok());
        cache.append("u", &[ev("7"), ev("3")]).await.unwrap();
        assert_eq!(cache.read("u").await.unwrap().0.indices, Some(vec![7, 3]));
        cache.append("u", &[ev("not-in-catalog")]).await.unwrap();
        assert_eq!(cache.read("u").await.unwrap().0.indices, None);
    }

    #[tokio::test]
    async fn expired_entries_are_reloaded() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store.clone(), 10, Duration::from_millis(0));
        cache.read("u").await.unwrap();
        cache.read("u").await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn capacity_is_bounded() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store, 3, Duration::from_secs(60));
        for u in 0..20 {
            cache.read(&format!("u{u}")).await.unwrap();
        }
        assert!(cache.len() <= 3, "{} entries", cache.len());
    }

    #[tokio::test]
    async fn store_down_serves_stale_reads_and_refuses_writes() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store.clone(), 10, Duration::from_millis(0));
        cache.append("u", &[ev("a")]).await.unwrap();
        cache.read("u").await.unwrap();
        store.down.store(true, Ordering::SeqCst);
        assert_eq!(cache.read("u").await.unwrap().0.events.len(), 1);
        assert!(cache.append("u", &[ev("b")]).await.is_err());
        assert!(cache.read("other").await.is_err(), "nothing cached for this user");
    }
}
