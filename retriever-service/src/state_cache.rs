//! Recently computed user states, so that a returning user costs one scoring pass and a user
//! with a few new events costs a few recurrence steps, not a pass over the whole history.
//!
//! The cache is keyed by content, not by user: an entry is the state after exactly the events
//! of its `window`, from the empty state. That is what [`crate::Retriever::state`] computes for
//! any history whose last `max_len` events are that window, so a hit is exact by construction,
//! whoever sent the history and however long it was. A request whose window extends a cached
//! window by up to [`MAX_CATCH_UP`] events resumes from it with [`Encoder::extend`], which gives
//! the same state as encoding from scratch (tested in `encoder`). A window that slid (a history
//! longer than `max_len` with a new event) shares no prefix with the old one and is recomputed.
//!
//! Keys are 64-bit hashes of the window; an entry keeps its window and is used only when the
//! window is equal, so a hash collision costs a miss, never a wrong state.

use crate::encoder::Encoder;
use crate::error::Result;
use crate::state::UserState;
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most new events a cached state is advanced by; beyond this a request is rarer than a
/// returning user, and probing more prefixes costs more than it saves.
pub const MAX_CATCH_UP: usize = 8;

/// Bytes an entry costs beyond its window and state (the key, the `Arc`, the cache's slot).
const ENTRY_OVERHEAD_BYTES: u64 = 96;

struct Entry {
    window: Box<[u32]>,
    state: UserState,
}

impl Entry {
    fn bytes(&self) -> u64 {
        let floats: usize = self.state.hidden.iter().map(Vec::len).sum::<usize>() + self.state.output.len();
        ENTRY_OVERHEAD_BYTES + 4 * (self.window.len() + floats) as u64
    }
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<u64, Arc<Entry>> for ByBytes {
    fn weight(&self, _key: &u64, entry: &Arc<Entry>) -> u64 {
        entry.bytes()
    }
}

/// How a state was obtained; counted for the metrics and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The same window was cached.
    Hit,
    /// A prefix of the window was cached and advanced by the new events.
    Extended,
    /// Encoded from scratch.
    Miss,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Extended => "extended",
            Outcome::Miss => "miss",
        }
    }
}

/// Counts of each [`Outcome`] since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Same window cached.
    pub hits: u64,
    /// Prefix cached and advanced.
    pub extended: u64,
    /// Encoded from scratch.
    pub misses: u64,
}

/// A byte-bounded cache of user states keyed by the exact events they absorbed.
pub struct StateCache {
    entries: Cache<u64, Arc<Entry>, ByBytes>,
    counts: [AtomicU64; 3],
}

impl StateCache {
    /// A cache holding at most about `capacity_bytes` of windows and states.
    pub fn new(capacity_bytes: u64) -> Self {
        // The item count is only a sizing hint for the shards; the weight bounds the memory.
        // A 200-event window with a 2-layer, 64-dimension state is about 1.9 KB.
        let estimated_items = (capacity_bytes / 2_000).max(16) as usize;
        Self { entries: Cache::with_weighter(estimated_items, capacity_bytes, ByBytes), counts: Default::default() }
    }

    /// The state after exactly `window` (the events the model reads, oldest first), from the
    /// cache when it holds `window` or (models that [can catch up](Encoder::can_catch_up)) a
    /// prefix of it at most [`MAX_CATCH_UP`] events shorter; whatever is computed is cached.
    pub fn state(&self, encoder: &Encoder, window: &[u32]) -> Result<(UserState, Outcome)> {
        let hashes = prefix_hashes(window);
        // A state without a recurrence (SASRec) cannot absorb events: only the same window helps.
        // A mixed ensemble's LRURec members absorb them and its SASRec members re-encode.
        let catch_up = if encoder.can_catch_up() { MAX_CATCH_UP } else { 0 };
        let shortest = window.len().saturating_sub(catch_up).max(1);
        for absorbed in (shortest..=window.len()).rev() {
            let Some(entry) = self.entries.get(&hashes[absorbed]) else { continue };
            if *entry.window != window[..absorbed] {
                continue;
            }
            let mut state = entry.state.clone();
            if absorbed == window.len() {
                return Ok((state, self.count(Outcome::Hit)));
            }
            encoder.catch_up(&mut state, window, absorbed)?;
            self.insert(hashes[window.len()], window, &state);
            return Ok((state, self.count(Outcome::Extended)));
        }
        let state = encoder.encode(window)?;
        if !window.is_empty() {
            self.insert(hashes[window.len()], window, &state);
        }
        Ok((state, self.count(Outcome::Miss)))
    }

    /// The state after exactly `window` if it is cached (counted as a hit); never computes.
    pub fn get(&self, window: &[u32]) -> Option<UserState> {
        let key = prefix_hashes(window)[window.len()];
        let entry = self.entries.get(&key).filter(|e| *e.window == *window)?;
        self.count(Outcome::Hit);
        Some(entry.state.clone())
    }

    /// Counts since start.
    pub fn stats(&self) -> Stats {
        let [hits, extended, misses] = &self.counts;
        Stats {
            hits: hits.load(Ordering::Relaxed),
            extended: extended.load(Ordering::Relaxed),
            misses: misses.load(Ordering::Relaxed),
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    fn insert(&self, key: u64, window: &[u32], state: &UserState) {
        self.entries.insert(key, Arc::new(Entry { window: window.into(), state: state.clone() }));
    }

    fn count(&self, outcome: Outcome) -> Outcome {
        let slot = match outcome {
            Outcome::Hit => 0,
            Outcome::Extended => 1,
            Outcome::Miss => 2,
        };
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        outcome
    }
}

/// `hashes[i]` is the hash of `window[..i]`, for i in 0..=len, in one pass (FxHash's mixing step:
/// fast, and collisions are caught by comparing windows).
fn prefix_hashes(window: &[u32]) -> Vec<u64> {
    const SEED: u64 = 0x517c_c1b7_2722_0a95;
    let mut hashes = Vec::with_capacity(window.len() + 1);
    let mut h = SEED;
    hashes.push(h);
    for &item in window {
        h = (h.rotate_left(5) ^ u64::from(item)).wrapping_mul(SEED);
        hashes.push(h);
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::tests::{lru_encoder, small_sasrec};
    use rand::{Rng, SeedableRng};

    fn encoder() -> Encoder {
        lru_encoder(7)
    }

    fn assert_close(a: &UserState, b: &UserState) {
        assert_eq!((a.events, a.hidden.len(), a.output.len()), (b.events, b.hidden.len(), b.output.len()));
        let pairs = a.hidden.iter().flatten().zip(b.hidden.iter().flatten()).chain(a.output.iter().zip(&b.output));
        let worst = pairs.map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "max |difference| {worst}");
    }

    fn random_history(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u32> {
        (0..len).map(|_| rng.gen_range(1..=50)).collect()
    }

    #[test]
    fn cached_states_equal_states_from_scratch_for_repeats_new_events_and_slid_windows() {
        let encoder = encoder();
        let cache = StateCache::new(1 << 20);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let history = random_history(&mut rng, 30);

        let (first, outcome) = cache.state(&encoder, &history).unwrap();
        assert_eq!(outcome, Outcome::Miss);
        assert_eq!(first, encoder.encode(&history).unwrap());

        let (again, outcome) = cache.state(&encoder, &history).unwrap();
        assert_eq!((outcome, &again), (Outcome::Hit, &first));

        // Three new events: resumed from the cached prefix, the same state as from scratch up to
        // rounding (encoding a run of events multiplies them as one matrix).
        let mut longer = history.clone();
        longer.extend([5, 6, 7]);
        let (extended, outcome) = cache.state(&encoder, &longer).unwrap();
        assert_eq!(outcome, Outcome::Extended);
        assert_close(&extended, &encoder.encode(&longer).unwrap());
        // ...and the extended window is now cached itself.
        assert_eq!(cache.state(&encoder, &longer).unwrap().1, Outcome::Hit);

        // Too many new events to catch up on: from scratch.
        let mut much_longer = history.clone();
        much_longer.extend(random_history(&mut rng, MAX_CATCH_UP + 1));
        assert_eq!(cache.state(&encoder, &much_longer).unwrap().1, Outcome::Miss);

        // A slid window (oldest event dropped) shares no cached prefix.
        let slid = &longer[1..];
        let (state, outcome) = cache.state(&encoder, slid).unwrap();
        assert_eq!((outcome, state), (Outcome::Miss, encoder.encode(slid).unwrap()));

        assert_eq!(cache.stats(), Stats { hits: 2, extended: 1, misses: 3 });
    }

    /// The shipped kind of ensemble (LRURec and SASRec members): a new event is caught up on
    /// (the LRURec member absorbs it, the SASRec member re-encodes), not encoded from scratch.
    #[test]
    fn a_mixed_ensemble_catches_up_on_new_events() {
        let encoder = Encoder::ensemble(vec![lru_encoder(3), small_sasrec(4, 50)]).unwrap();
        let cache = StateCache::new(1 << 20);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut history = random_history(&mut rng, 20);
        assert_eq!(cache.state(&encoder, &history).unwrap().1, Outcome::Miss);
        history.push(9);
        let (state, outcome) = cache.state(&encoder, &history).unwrap();
        assert_eq!(outcome, Outcome::Extended);
        assert_close(&state, &encoder.encode(&history).unwrap());
    }

    #[test]
    fn a_different_history_with_a_common_prefix_is_not_confused_with_it() {
        let encoder = encoder();
        let cache = StateCache::new(1 << 20);
        cache.state(&encoder, &[1, 2, 3, 4]).unwrap();
        // Same length, different last event: not a hit; its prefix [1, 2, 3] was never cached.
        let (state, outcome) = cache.state(&encoder, &[1, 2, 3, 9]).unwrap();
        assert_eq!((outcome, state), (Outcome::Miss, encoder.encode(&[1, 2, 3, 9]).unwrap()));
        // A prefix of a cached window is a different window: computed, not served from [1,2,3,4].
        let (state, outcome) = cache.state(&encoder, &[1, 2, 3]).unwrap();
        assert_eq!((outcome, state), (Outcome::Miss, encoder.encode(&[1, 2, 3]).unwrap()));
    }

    #[test]
    fn memory_stays_within_the_byte_budget() {
        let encoder = encoder();
        let budget = 64 * 1024;
        let cache = StateCache::new(budget);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..2_000 {
            let len = rng.gen_range(1..64);
            cache.state(&encoder, &random_history(&mut rng, len)).unwrap();
        }
        assert!(cache.bytes() <= budget, "{} bytes held, budget {budget}", cache.bytes());
        assert!(cache.bytes() > budget / 2, "the cache should fill up: {} bytes", cache.bytes());
    }

    #[test]
    fn prefix_hashes_differ_by_order_and_length() {
        let a = prefix_hashes(&[1, 2, 3]);
        let b = prefix_hashes(&[2, 1, 3]);
        assert_eq!(a.len(), 4);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[3], b[3]);
        assert_ne!(prefix_hashes(&[0])[1], a[0]);
    }
}
