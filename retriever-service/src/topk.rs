//! Top-k items for a query vector over the whole catalog: blocked dot products (a fixed-size
//! score buffer, whatever the catalog size) feeding a bounded min-heap, optionally on several
//! threads for large catalogs.

use crate::kernels::scores_into;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One retrieved item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Dense item index (1-based).
    pub item: u32,
    /// Model score (higher is better).
    pub score: f32,
}

/// Heap entry ordered so that the heap's top is the *worst* kept candidate: lower score first,
/// and among equal scores the higher index (ties go to the lower index, deterministically).
#[derive(PartialEq)]
struct Worst(Candidate);

impl Eq for Worst {}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.score.total_cmp(&self.0.score).then_with(|| self.0.item.cmp(&other.0.item))
    }
}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The k best candidates seen so far.
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k + 1) }
    }

    pub(crate) fn offer(&mut self, c: Candidate) {
        if self.heap.len() < self.k {
            self.heap.push(Worst(c));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if Worst(c) < *worst {
                *worst = Worst(c);
            }
        }
    }

    /// Candidates best first.
    pub(crate) fn into_sorted(self) -> Vec<Candidate> {
        // Ascending order of `Worst` is best first.
        self.heap.into_sorted_vec().into_iter().map(|w| w.0).collect()
    }
}

/// Items scored per block: 4096 scores (16 KiB) stay in L1/L2 next to the heap.
const BLOCK: usize = 4096;

/// The top `k` items of `embedding` ((num_rows × dim), row i = item i) by
/// `embedding[i] · query + bias[i]`, best first, skipping item 0 (padding) and every item in
/// `excluded` (any order, duplicates allowed). Work is split across up to `threads` threads.
pub fn top_k(query: &[f32], embedding: &[f32], bias: &[f32], k: usize, excluded: &[u32], threads: usize) -> Vec<Candidate> {
    let dim = query.len();
    assert_eq!(embedding.len(), bias.len() * dim, "embedding must hold one row per bias entry");
    top_k_by(bias.len(), k, excluded, threads, &|start, out: &mut [f32]| {
        let end = start + out.len();
        scores_into(query, &embedding[start * dim..end * dim], &bias[start..end], out)
    })
}

/// The top `k` of `num_rows` rows scored block by block by `score(start, out)` (which fills
/// `out` with the scores of rows `start..start + out.len()`), with the same exclusions and
/// tie rule as [`top_k`].
pub(crate) fn top_k_by(
    num_rows: usize,
    k: usize,
    excluded: &[u32],
    threads: usize,
    score: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<Candidate> {
    let mut excluded: Vec<u32> = excluded.iter().copied().filter(|&i| (i as usize) < num_rows).collect();
    excluded.push(0);
    excluded.sort_unstable();
    excluded.dedup();
    if k == 0 {
        return Vec::new();
    }
    let threads = threads.clamp(1, num_rows.div_ceil(BLOCK).max(1));
    let per_thread = num_rows.div_ceil(threads);
    let partials: Vec<Vec<Candidate>> = if threads == 1 {
        vec![top_k_range(score, k, &excluded, 0, num_rows)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let start = t * per_thread;
                    let end = ((t + 1) * per_thread).min(num_rows);
                    let excluded = &excluded;
                    scope.spawn(move || top_k_range(score, k, excluded, start, end))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("scoring thread panicked")).collect()
        })
    };
    let mut merged = TopK::new(k);
    partials.into_iter().flatten().for_each(|c| merged.offer(c));
    merged.into_sorted()
}

/// Top-k over rows `start..end`; `excluded` is sorted.
fn top_k_range(score: &(dyn Fn(usize, &mut [f32]) + Sync), k: usize, excluded: &[u32], start: usize, end: usize) -> Vec<Candidate> {
    let mut top = TopK::new(k);
    let mut scores = vec![0.0f32; BLOCK];
    let mut skip = excluded.partition_point(|&i| (i as usize) < start);
    let mut block_start = start;
    while block_start < end {
        let len = BLOCK.min(end - block_start);
        let block_scores = &mut scores[..len];
        score(block_start, block_scores);
        while skip < excluded.len() && (excluded[skip] as usize) < block_start + len {
            block_scores[excluded[skip] as usize - block_start] = f32::NEG_INFINITY;
            skip += 1;
        }
        for (offset, &score) in block_scores.iter().enumerate() {
            if score > f32::NEG_INFINITY {
                top.offer(Candidate { item: (block_start + offset) as u32, score });
            }
        }
        block_start += len;
    }
    top.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Reference: score everything, sort fully.
    fn brute_force(query: &[f32], embedding: &[f32], bias: &[f32], k: usize, excluded: &[u32]) -> Vec<u32> {
        let dim = query.len();
        let mut all: Vec<(f32, u32)> = (1..bias.len())
            .filter(|i| !excluded.contains(&(*i as u32)))
            .map(|i| (crate::kernels::dot(query, &embedding[i * dim..(i + 1) * dim]) + bias[i], i as u32))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        all.into_iter().take(k).map(|(_, i)| i).collect()
    }

    #[test]
    fn matches_a_full_sort_across_blocks_threads_and_exclusions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, dim) = (3 * BLOCK + 17, 8);
        let embedding: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect();
        let query: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let want_all = brute_force(&query, &embedding, &bias, 50, &[]);
        // Exclude some of the best items, one of them twice, plus out-of-range noise.
        let excluded = vec![want_all[0], want_all[3], want_all[3], want_all[20], n as u32 + 5];
        let want = brute_force(&query, &embedding, &bias, 25, &excluded);
        for threads in [1, 2, 3] {
            let got: Vec<u32> = top_k(&query, &embedding, &bias, 25, &excluded, threads).iter().map(|c| c.item).collect();
            assert_eq!(got, want, "threads {threads}");
        }
    }

    #[test]
    fn never_returns_padding_and_handles_k_beyond_the_catalog() {
        let embedding = vec![10.0, 1.0, 2.0, 3.0];
        let bias = vec![100.0, 0.0, 0.0, 0.0];
        let got = top_k(&[1.0], &embedding, &bias, 10, &[2], 1);
        assert_eq!(got.iter().map(|c| c.item).collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(got[0].score, 3.0);
        assert!(top_k(&[1.0], &embedding, &bias, 0, &[], 1).is_empty());
    }

    #[test]
    fn ties_prefer_the_lower_index() {
        let embedding = vec![0.0; 6];
        let bias = vec![0.0; 6];
        let got: Vec<u32> = top_k(&[1.0], &embedding, &bias, 3, &[], 1).iter().map(|c| c.item).collect();
        assert_eq!(got, vec![1, 2, 3]);
    }
}
