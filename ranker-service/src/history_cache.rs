//! The per-user history cache: the attention state of `[prefix][history]` for recently seen
//! histories, so a returning user's request only runs its candidate part. Bounded by bytes.
//!
//! The cache is `quick_cache`'s single-threaded `unsync::Cache` (it lives on the model thread),
//! weighed in bytes, the crate the gateway's user histories and the retriever's states use too.
//! Its eviction is S3-FIFO-like, not least-recently-used: once the cache is full, a new history
//! waits in a probation queue and joins the protected part only when it is read again (or its key was evicted a
//! short while ago and is remembered as a ghost), so a run of histories seen once does not push
//! out the ones being reused. Half the bytes are kept for the protected part and the ghosts
//! remember 4× as many keys as fit: with quick_cache's defaults (97 %, ½×), on skewed traffic
//! whose histories change with new events, it kept half of what an exact LRU kept at 1–4 GiB.
//! Measured against the exact LRU this cache was before, on `llamarec traffic synth`'s stream
//! with the real entry sizes: level on synth's uniform draw, ahead on skewed draws (BENCHMARKS.md,
//! "Ranker history cache: LRU vs quick_cache"; `examples/history_cache_policies.rs`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use quick_cache::unsync::Cache;
use quick_cache::{OptionsBuilder, Weighter};

/// The cache key of a rendered history: a hash of its token ids. Entries also keep the ids, so a
/// hash collision is a miss, never someone else's state.
pub fn history_key(ids: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    ids.hash(&mut h);
    h.finish()
}

/// A guess of one entry's bytes when the caller gives none, to size the cache's tables and its
/// memory of evicted keys: ~320 prompt tokens (the instruction and 20 MovieLens titles) of
/// SmolLM2-135M's f32 KV state, 45 KiB a token.
const TYPICAL_ENTRY_BYTES: usize = 14 << 20;

/// Share of the bytes for entries that were read again (quick_cache's "hot" part); also the
/// largest entry admitted, as a share of the capacity.
const PROTECTED_SHARE: f64 = 0.5;

/// quick_cache remembers evicted keys for half its estimated item count: estimating 8× the
/// entries that fit remembers 4× as many keys as are cached.
const ESTIMATED_ITEMS_PER_FITTING_ENTRY: usize = 8;

struct Entry<V> {
    ids: Box<[u32]>,
    value: V,
    bytes: usize,
}

#[derive(Clone)]
struct ByBytes;

impl<V> Weighter<u64, Entry<V>> for ByBytes {
    fn weight(&self, _key: &u64, entry: &Entry<V>) -> u64 {
        // quick_cache never evicts an entry that weighs 0.
        entry.bytes.max(1) as u64
    }
}

/// A byte-bounded map from history token ids to a value (a [`crate::KvCache`] when serving).
pub struct HistoryCache<V> {
    capacity_bytes: usize,
    entries: Cache<u64, Entry<V>, ByBytes>,
}

impl<V: Clone> HistoryCache<V> {
    /// An empty cache holding at most `capacity_bytes`.
    pub fn new(capacity_bytes: usize) -> Self {
        Self::with_typical_entry(capacity_bytes, TYPICAL_ENTRY_BYTES)
    }

    /// An empty cache holding at most `capacity_bytes`, sized for entries of about
    /// `typical_entry_bytes`.
    pub fn with_typical_entry(capacity_bytes: usize, typical_entry_bytes: usize) -> Self {
        let fitting = (capacity_bytes / typical_entry_bytes.max(1)).max(1);
        let options = OptionsBuilder::new()
            .estimated_items_capacity(fitting * ESTIMATED_ITEMS_PER_FITTING_ENTRY)
            .weight_capacity(capacity_bytes as u64)
            .hot_allocation(PROTECTED_SHARE)
            .build()
            .expect("estimated items and weight capacity are set");
        Self {
            capacity_bytes,
            entries: Cache::with_options(options, ByBytes, Default::default(), Default::default()),
        }
    }

    /// The value cached for `ids` (under `key = history_key(ids)`), marking it used.
    pub fn get(&mut self, key: u64, ids: &[u32]) -> Option<V> {
        self.entries
            .get(&key)
            .filter(|e| *e.ids == *ids)
            .map(|e| e.value.clone())
    }

    /// Caches `value` of `bytes` for `ids` (replacing what `key` held), evicting other entries
    /// until it fits. A value over half the capacity (the protected part's share) is not
    /// cached and evicts nothing but `key`'s old entry.
    pub fn insert(&mut self, key: u64, ids: &[u32], value: V, bytes: usize) {
        self.entries.insert(
            key,
            Entry {
                ids: ids.into(),
                value,
                bytes,
            },
        );
    }

    /// The byte bound.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Bytes held by cached values.
    pub fn used_bytes(&self) -> usize {
        self.entries.weight() as usize
    }

    /// Number of cached histories.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::rng::Rng;

    fn put(c: &mut HistoryCache<u32>, id: u32, bytes: usize) {
        c.insert(history_key(&[id]), &[id], id, bytes);
    }

    fn get(c: &mut HistoryCache<u32>, id: u32) -> Option<u32> {
        c.get(history_key(&[id]), &[id])
    }

    #[test]
    fn never_holds_more_than_its_byte_bound() {
        let mut rng = Rng::new(19);
        for capacity in [1_000, 10_000, 100_000] {
            let mut c = HistoryCache::with_typical_entry(capacity, 1_000);
            for _ in 0..20_000 {
                let id = rng.below(300) as u32;
                if get(&mut c, id).is_none() {
                    put(&mut c, id, 1 + rng.below(2_000));
                }
                assert!(
                    c.used_bytes() <= capacity,
                    "{} > {capacity}",
                    c.used_bytes()
                );
            }
            assert!(!c.is_empty());
        }
    }

    #[test]
    fn an_entry_over_half_the_bound_is_not_kept_and_evicts_nothing() {
        let mut c = HistoryCache::with_typical_entry(100, 10);
        put(&mut c, 1, 30);
        put(&mut c, 2, 30);
        put(&mut c, 3, 101); // larger than the whole cache
        put(&mut c, 4, 51); // larger than the protected half
        assert_eq!((get(&mut c, 3), get(&mut c, 4)), (None, None));
        assert_eq!((get(&mut c, 1), get(&mut c, 2)), (Some(1), Some(2)));
        assert_eq!((c.len(), c.used_bytes()), (2, 60));
        put(&mut c, 5, 50); // exactly half fits
        assert_eq!(get(&mut c, 5), Some(5));
        assert!(c.used_bytes() <= 100);
    }

    #[test]
    fn a_reused_entry_survives_a_scan_of_one_time_histories() {
        let mut c = HistoryCache::with_typical_entry(100, 10);
        // A warm cache: ten entries read once more each, so the protected half is full.
        for id in 0..10 {
            put(&mut c, id, 10);
            get(&mut c, id);
        }
        put(&mut c, 100, 10);
        assert_eq!(get(&mut c, 100), Some(100));
        // A thousand histories seen once each (new users, or users with new events).
        for id in 1_000..2_000 {
            put(&mut c, id, 10);
            assert!(c.used_bytes() <= 100);
        }
        assert_eq!(
            get(&mut c, 100),
            Some(100),
            "an exact LRU evicts it after 10"
        );
    }

    #[test]
    fn replacing_a_key_frees_its_old_bytes() {
        let mut c = HistoryCache::with_typical_entry(100, 10);
        put(&mut c, 1, 40);
        c.insert(history_key(&[1]), &[1], 7, 20);
        assert_eq!((c.len(), c.used_bytes(), get(&mut c, 1)), (1, 20, Some(7)));
    }

    #[test]
    fn a_key_collision_is_a_miss() {
        let mut c = HistoryCache::new(100);
        c.insert(7, &[1, 2], "a", 10);
        assert_eq!(c.get(7, &[1, 3]), None);
        assert_eq!(c.get(7, &[1, 2]), Some("a"));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut c = HistoryCache::new(0);
        c.insert(1, &[1], "a", 1);
        c.insert(2, &[2], "b", 0);
        assert!(c.is_empty());
    }
}
