//! A bounded, expiring cache of users' histories in front of a [`HistoryStore`] (not to be
//! confused with the ranker's `history_cache`, which holds attention state for a history's
//! prompt tokens).
//!
//! Entries expire after a TTL because other gateway replicas may append to the same user
//! through a shared store; this replica's own appends invalidate its entry at once.
//!
//! The cache is `quick_cache` (S3-FIFO eviction, sharded locks) bounded in bytes, since one
//! user's history may be a hundred times another's. A read that started before an append must
//! not put the pre-append history back after the append invalidated it: every append bumps a
//! per-user generation (striped, so memory stays fixed), and a read caches what it loaded only
//! if its user's generation did not move while it was reading.

use super::{HistoryStore, StoreError, StoredEvent};
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
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

impl CachedHistory {
    /// Heap and inline bytes this history holds (what the cache's byte bound counts).
    pub fn bytes(&self) -> u64 {
        let events: usize = self.events.iter().map(|e| std::mem::size_of::<StoredEvent>() + e.item_id.len()).sum();
        let indices = self.indices.as_ref().map_or(0, |i| 4 * i.len());
        (std::mem::size_of::<Self>() + events + indices) as u64
    }
}

/// Bytes an entry costs beyond its user id and history (the `Arc`s, the instant, the slot).
const ENTRY_OVERHEAD_BYTES: u64 = 96;

#[derive(Clone)]
struct ByBytes;

impl Weighter<String, Arc<Entry>> for ByBytes {
    fn weight(&self, user: &String, entry: &Arc<Entry>) -> u64 {
        ENTRY_OVERHEAD_BYTES + user.len() as u64 + entry.history.bytes()
    }
}

/// Stripes of the per-user append generation: two users sharing a stripe only cost each other
/// a skipped cache insert now and then, never a stale answer.
const GENERATION_STRIPES: usize = 4096;

/// A guess of the bytes an average cached history takes, to size the cache's hash tables.
const TYPICAL_ENTRY_BYTES: u64 = 4096;

/// Histories cached per user.
pub struct UserHistoryCache<S> {
    store: S,
    entries: Cache<String, Arc<Entry>, ByBytes>,
    generations: Box<[AtomicU64]>,
    hasher: RandomState,
    ttl: Duration,
    resolve: Option<Resolver>,
}

/// External item id -> dense catalog index.
type Resolver = Arc<dyn Fn(&str) -> Option<u32> + Send + Sync>;

/// Where a history came from, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Served from the cache.
    Cache,
    /// Read from the store.
    Store,
}

impl<S: HistoryStore> UserHistoryCache<S> {
    /// Wraps `store` with at most `capacity_bytes` of histories cached, each for `ttl`.
    pub fn new(store: S, capacity_bytes: u64, ttl: Duration) -> Self {
        let capacity_bytes = capacity_bytes.max(1);
        let estimated_entries = (capacity_bytes / TYPICAL_ENTRY_BYTES).clamp(16, 1 << 20) as usize;
        Self {
            store,
            entries: Cache::with_weighter(estimated_entries, capacity_bytes, ByBytes),
            generations: (0..GENERATION_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            ttl,
            resolve: None,
        }
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

    fn generation(&self, user: &str) -> &AtomicU64 {
        &self.generations[self.hasher.hash_one(user) as usize % GENERATION_STRIPES]
    }

    /// The user's history, from the cache when fresh. When the store is down, a stale cached
    /// entry is still served (reads keep working; writes are refused by `append`).
    pub async fn read(&self, user: &str) -> Result<(Arc<CachedHistory>, Source), StoreError> {
        let cached = self.entries.get(user);
        if let Some(e) = &cached {
            if e.loaded.elapsed() < self.ttl {
                return Ok((e.history.clone(), Source::Cache));
            }
        }
        let generation = self.generation(user);
        let before = generation.load(Ordering::SeqCst);
        match self.store.read(user).await {
            Ok(events) => {
                let indices = self.resolve.as_ref().and_then(|resolve| events.iter().map(|e| resolve(&e.item_id)).collect());
                let history = Arc::new(CachedHistory { events, indices });
                if generation.load(Ordering::SeqCst) == before {
                    self.entries.insert(user.to_string(), Arc::new(Entry { history: history.clone(), loaded: Instant::now() }));
                    // An append that bumped the generation between the check and the insert
                    // removes after its bump, hence after this insert, or is seen here.
                    if generation.load(Ordering::SeqCst) != before {
                        self.entries.remove(user);
                    }
                }
                Ok((history, Source::Store))
            }
            Err(err) => match cached {
                Some(stale) => {
                    tracing::warn!(%err, user, "history store failed; serving a stale cached history");
                    Ok((stale.history.clone(), Source::Cache))
                }
                None => Err(err),
            },
        }
    }

    /// Appends durably, then drops the cached entry so the next read sees the append (and a
    /// read already under way does not cache what it loaded before).
    pub async fn append(&self, user: &str, events: &[StoredEvent]) -> Result<u32, StoreError> {
        let len = self.store.append(user, events).await?;
        self.generation(user).fetch_add(1, Ordering::SeqCst);
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

    /// Bytes of histories cached (as the byte bound counts them).
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
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
        /// When set, a read takes its snapshot, then waits for `release` before returning it.
        gate: AtomicBool,
        snapshot_taken: tokio::sync::Notify,
        release: tokio::sync::Notify,
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
            let snapshot = self.data.lock().unwrap().get(user).cloned().unwrap_or_default();
            if self.gate.swap(false, Ordering::SeqCst) {
                self.snapshot_taken.notify_one();
                self.release.notified().await;
            }
            Ok(snapshot)
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
        let cache = UserHistoryCache::new(store.clone(), 1 << 20, Duration::from_secs(60));
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
        let cache = UserHistoryCache::new(store.clone(), 1 << 20, Duration::from_secs(60)).with_resolver(|id| id.parse().ok());
        cache.append("u", &[ev("7"), ev("3")]).await.unwrap();
        assert_eq!(cache.read("u").await.unwrap().0.indices, Some(vec![7, 3]));
        cache.append("u", &[ev("not-in-catalog")]).await.unwrap();
        assert_eq!(cache.read("u").await.unwrap().0.indices, None);
    }

    #[tokio::test]
    async fn expired_entries_are_reloaded() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store.clone(), 1 << 20, Duration::from_millis(0));
        cache.read("u").await.unwrap();
        cache.read("u").await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn capacity_is_bounded_in_bytes_whatever_the_history_lengths() {
        let store = Arc::new(Counting::default());
        let long: Vec<StoredEvent> = (0..1000).map(|i| ev(&format!("item-{i}"))).collect();
        for u in 0..40 {
            store.append(&format!("u{u}"), &long).await.unwrap();
        }
        let one = CachedHistory { events: long.clone(), indices: None }.bytes();
        assert!(one > 32_000, "a 1,000-event history weighs {one} bytes");
        let budget = 8 * one;
        let cache = UserHistoryCache::new(store, budget, Duration::from_secs(60));
        for u in 0..40 {
            cache.read(&format!("u{u}")).await.unwrap();
        }
        assert!(cache.bytes() <= budget, "{} bytes cached of {budget}", cache.bytes());
        assert!(cache.len() < 10, "{} long histories fit in 8 histories' bytes", cache.len());
        assert!(!cache.is_empty());
    }

    #[tokio::test]
    async fn a_read_that_started_before_an_append_does_not_cache_the_old_history() {
        let store = Arc::new(Counting::default());
        let cache = Arc::new(UserHistoryCache::new(store.clone(), 1 << 20, Duration::from_secs(60)));
        cache.append("u", &[ev("a")]).await.unwrap();
        store.gate.store(true, Ordering::SeqCst);
        let slow_read = tokio::spawn({
            let cache = cache.clone();
            async move { cache.read("u").await.unwrap() }
        });
        store.snapshot_taken.notified().await;
        // The slow read holds the one-event history; the append lands and invalidates meanwhile.
        cache.append("u", &[ev("b")]).await.unwrap();
        store.release.notify_one();
        let (old, _) = slow_read.await.unwrap();
        assert_eq!(old.events.len(), 1, "the slow read answers with what it read");
        let (now, source) = cache.read("u").await.unwrap();
        assert_eq!(now.events.len(), 2, "the appended event must not be hidden by the slow read's insert ({source:?})");
    }

    #[tokio::test]
    async fn store_down_serves_stale_reads_and_refuses_writes() {
        let store = Arc::new(Counting::default());
        let cache = UserHistoryCache::new(store.clone(), 1 << 20, Duration::from_millis(0));
        cache.append("u", &[ev("a")]).await.unwrap();
        cache.read("u").await.unwrap();
        store.down.store(true, Ordering::SeqCst);
        assert_eq!(cache.read("u").await.unwrap().0.events.len(), 1);
        assert!(cache.append("u", &[ev("b")]).await.is_err());
        assert!(cache.read("other").await.is_err(), "nothing cached for this user");
    }
}
