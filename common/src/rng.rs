//! The one seeded generator of the workspace (SplitMix64): the ranker trainer's example order,
//! negatives and LoRA dropout masks, the CLI's synthetic benchmark titles, and, through
//! [`splitmix64`] alone, the gateway's sampling hash.
//!
//! Why not a crate such as `rand_pcg`: a training run saves this generator in its checkpoint
//! (`trainer_state.json` holds `"rng": {"state": <u64>}`) and resumes from it, so the committed
//! runs under `ranker-service/training/*/checkpoint` resume with the same example order,
//! negatives and dropout masks only if the state format and every output stay exactly these;
//! another generator would read that state as a different stream. The pinned values in the
//! tests below are what the generator produced before it moved here.

use serde::{Deserialize, Serialize};

/// SplitMix64's increment (2^64 / the golden ratio).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function on a state: a cheap, well-mixed 64-bit hash of `x`, also used
/// on its own for sampling decisions. Equal to `Rng::new(x).next_u64()`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: fast, statistically fine for sampling and shuffling, one word of state, which
/// serializes as `{"state": <u64>}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for sub-stream `stream` of `seed` (independent of the others in practice).
    pub fn derived(seed: u64, stream: u64) -> Self {
        let mut r = Self::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.state);
        self.state = self.state.wrapping_add(GAMMA);
        out
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[0, n)`; `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        // Multiply-shift: bias below 2^-32 for the sizes used here.
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_shuffles_are_permutations() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(
            (0..5).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..5).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        let mut xs: Vec<u32> = (0..20).collect();
        a.shuffle(&mut xs);
        assert_ne!(xs, (0..20).collect::<Vec<_>>());
        xs.sort_unstable();
        assert_eq!(xs, (0..20).collect::<Vec<_>>());
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[a.below(4)] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    /// The outputs of the three copies this module replaced (the ranker trainer's `Rng`, the
    /// LoRA dropout stream, the gateway's sampling hash), computed with that code before the
    /// move: a change here changes every committed training run's resumption.
    #[test]
    fn outputs_are_pinned_to_the_generator_the_committed_runs_saved() {
        let first = |mut r: Rng, n: usize| (0..n).map(|_| r.next_u64()).collect::<Vec<_>>();
        assert_eq!(first(Rng::new(0), 3), [0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f]);
        assert_eq!(first(Rng::new(7), 3), [0x63cbe1e459320dd7, 0x044c3cd7f43c661c, 0xe6984080bab12a02]);
        assert_eq!(first(Rng::new(42), 3), [0xbdd732262feb6e95, 0x28efe333b266f103, 0x47526757130f9f52]);
        // The trainer's streams: epoch order (1), its state (3), repeats (10_000 + i), dropout
        // seeds (1000 + examples).
        assert_eq!(first(Rng::derived(42, 1), 2), [0x3b3335584873a7b9, 0x491400c5aad09a09]);
        assert_eq!(first(Rng::derived(42, 3), 2), [0x8f6ecc76132e5b97, 0xb9805b534ff220ac]);
        assert_eq!(first(Rng::derived(7, 10_000), 2), [0xce9c63d6491f0e7b, 0x8519f1f48dfefa00]);
        assert_eq!(first(Rng::derived(0, 1000), 2), [0x3ab94c3e60887781, 0x142030e33a84b185]);

        let mut r = Rng::derived(42, 2);
        assert_eq!((0..5).map(|_| r.below(1000)).collect::<Vec<_>>(), [860, 153, 87, 931, 664]);
        let mut r = Rng::new(1);
        let bits: Vec<u32> = (0..3).map(|_| r.next_f32().to_bits()).collect();
        assert_eq!(bits, [0x3f110a2d, 0x3f3eeb8d, 0x3f7893a2]);
        let mut xs: Vec<u32> = (0..10).collect();
        Rng::derived(42, 1).shuffle(&mut xs);
        assert_eq!(xs, [6, 3, 7, 5, 8, 1, 4, 0, 9, 2]);

        // The gateway's sampling hash is the first output of a generator seeded with its input.
        for (x, hash) in [(0, 0xe220a8397b1dcdaf), (1, 0x910a2dec89025cc1), (GAMMA, 0x6e789e6aa1b965f4), (u64::MAX, 0xe4d971771b652c20)] {
            assert_eq!(splitmix64(x), hash, "{x:#x}");
            assert_eq!(Rng::new(x).next_u64(), hash, "{x:#x}");
        }
    }

    /// The state as `ranker-service/training/ml-100k-all-linear/checkpoint/trainer_state.json`
    /// saved it, and what a resumed run draws from it.
    #[test]
    fn a_saved_trainer_state_resumes_the_same_stream() {
        let mut r: Rng = serde_json::from_str(r#"{"state": 1820570301473874935}"#).unwrap();
        assert_eq!(r.next_u64(), 0x554f9c2d61bf874c);
        assert_eq!((r.below(20), r.below(1682)), (4, 823));
        let mut xs: Vec<u32> = (0..8).collect();
        r.shuffle(&mut xs);
        assert_eq!(xs, [0, 2, 4, 7, 5, 6, 3, 1]);
        assert_eq!(serde_json::to_string(&Rng::new(5)).unwrap(), r#"{"state":5}"#);
    }
}
