//! The per-user history cache: the attention state of `[prefix][history]` for recently seen
//! histories, so a returning user's request only runs its candidate part. Bounded by bytes and
//! evicted least-recently-used first.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// The cache key of a rendered history: a hash of its token ids. Entries also keep the ids, so a
/// hash collision is a miss, never someone else's state.
pub fn history_key(ids: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    ids.hash(&mut h);
    h.finish()
}

struct Slot<V> {
    ids: Vec<u32>,
    value: V,
    bytes: usize,
    last_used: u64,
}

/// A byte-bounded LRU map from history token ids to a value (a [`crate::KvCache`] when serving).
pub struct HistoryCache<V> {
    capacity_bytes: usize,
    used_bytes: usize,
    clock: u64,
    slots: HashMap<u64, Slot<V>>,
    /// `last_used -> key`, oldest first.
    order: BTreeMap<u64, u64>,
}

impl<V: Clone> HistoryCache<V> {
    /// An empty cache holding at most `capacity_bytes`.
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            used_bytes: 0,
            clock: 0,
            slots: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The value cached for `ids` (under `key = history_key(ids)`), marking it most recently used.
    pub fn get(&mut self, key: u64, ids: &[u32]) -> Option<V> {
        self.clock += 1;
        let slot = self.slots.get_mut(&key).filter(|s| s.ids == ids)?;
        self.order.remove(&slot.last_used);
        slot.last_used = self.clock;
        self.order.insert(self.clock, key);
        Some(slot.value.clone())
    }

    /// Caches `value` of `bytes` for `ids`, evicting least-recently-used entries until it fits.
    /// A value larger than the whole capacity is not cached.
    pub fn insert(&mut self, key: u64, ids: &[u32], value: V, bytes: usize) {
        if bytes > self.capacity_bytes {
            return;
        }
        self.remove(key);
        while self.used_bytes + bytes > self.capacity_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&oldest) {
                self.used_bytes -= slot.bytes;
            }
        }
        self.clock += 1;
        self.order.insert(self.clock, key);
        self.used_bytes += bytes;
        self.slots.insert(
            key,
            Slot {
                ids: ids.to_vec(),
                value,
                bytes,
                last_used: self.clock,
            },
        );
    }

    fn remove(&mut self, key: u64) {
        if let Some(slot) = self.slots.remove(&key) {
            self.order.remove(&slot.last_used);
            self.used_bytes -= slot.bytes;
        }
    }

    /// The byte bound.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Bytes held by cached values.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Number of cached histories.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &mut HistoryCache<&'static str>, ids: &[u32], v: &'static str, bytes: usize) {
        c.insert(history_key(ids), ids, v, bytes);
    }

    fn get(c: &mut HistoryCache<&'static str>, ids: &[u32]) -> Option<&'static str> {
        c.get(history_key(ids), ids)
    }

    #[test]
    fn stays_within_its_byte_bound_evicting_least_recently_used_first() {
        let mut c = HistoryCache::new(100);
        put(&mut c, &[1], "a", 40);
        put(&mut c, &[2], "b", 40);
        assert_eq!(get(&mut c, &[1]), Some("a")); // [2] is now the least recently used
        put(&mut c, &[3], "c", 40);
        assert_eq!((c.len(), c.used_bytes()), (2, 80));
        assert_eq!(get(&mut c, &[2]), None);
        assert_eq!(get(&mut c, &[1]), Some("a"));
        assert_eq!(get(&mut c, &[3]), Some("c"));
        // One big entry pushes out both.
        put(&mut c, &[4], "d", 90);
        assert_eq!((c.len(), c.used_bytes()), (1, 90));
        // Larger than the whole cache: not cached, nothing evicted.
        put(&mut c, &[5], "e", 101);
        assert_eq!((get(&mut c, &[5]), get(&mut c, &[4])), (None, Some("d")));
        // Replacing a key frees its old bytes first.
        put(&mut c, &[4], "d2", 60);
        assert_eq!(
            (c.len(), c.used_bytes(), get(&mut c, &[4])),
            (1, 60, Some("d2"))
        );
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
        put(&mut c, &[1], "a", 1);
        assert!(c.is_empty());
    }
}
