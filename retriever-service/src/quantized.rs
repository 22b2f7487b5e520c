//! Int8 item embeddings for large catalogs, with an exact f32 re-scoring of a short list.
//!
//! Scoring a million-item catalog reads the whole embedding matrix per request, so it is bound
//! by memory bandwidth: 256 MB in f32, 64 MB in int8. Each row is stored as int8 codes with one
//! f32 scale (symmetric, per row), the catalog is scanned in int8 for a short list, and the
//! short list is re-scored exactly in f32. The quantisation error of a row is bounded by
//! `scale / 2 · ‖query‖₁`, so the short list is provably long enough when its last approximate
//! score plus that bound stays below the k-th exact score; when it is not, the request falls back
//! to the full f32 scan. Either way the answer is the f32 ranking.

use crate::kernels::scores_into;
use crate::topk::{top_k, top_k_by, Candidate, TopK};

/// Relative slack on the error bound for f32 rounding in both dot products (64-term sums have
/// a relative error near 1e-5; this is ten times that).
const ROUNDING_SLACK: f32 = 1e-4;

/// Per-row symmetric int8 copy of an embedding matrix.
pub struct QuantizedEmbedding {
    dim: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
    max_scale: f32,
    max_abs: f32,
}

impl QuantizedEmbedding {
    /// Quantises `embedding` (rows of width `dim`).
    pub fn new(embedding: &[f32], dim: usize) -> Self {
        assert!(dim > 0 && embedding.len().is_multiple_of(dim), "embedding must be whole rows of width {dim}");
        assert!(dim <= 4096, "rows wider than 4096 could overflow the i32 dot product");
        let rows = embedding.len() / dim;
        let mut codes = vec![0i8; embedding.len()];
        let mut scales = vec![0f32; rows];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for ((row, code), scale) in embedding.chunks_exact(dim).zip(codes.chunks_exact_mut(dim)).zip(&mut scales) {
            let abs = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            *scale = if abs > 0.0 { abs / 127.0 } else { 1.0 };
            for (c, v) in code.iter_mut().zip(row) {
                *c = (v / *scale).round().clamp(-127.0, 127.0) as i8;
            }
            max_scale = max_scale.max(*scale);
            max_abs = max_abs.max(abs);
        }
        Self { dim, codes, scales, max_scale, max_abs }
    }

    /// Bytes held by the codes and scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Exactly [`top_k`] over the f32 `embedding` this copy was made from, computed from an
    /// int8 scan for a short list of `shortlist` items re-scored in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn top_k(
        &self,
        query: &[f32],
        embedding: &[f32],
        bias: &[f32],
        k: usize,
        excluded: &[u32],
        threads: usize,
        shortlist: usize,
    ) -> Vec<Candidate> {
        let dim = self.dim;
        assert_eq!(query.len(), dim);
        assert_eq!(self.scales.len(), bias.len(), "bias must have one entry per quantised row");
        if k == 0 {
            return Vec::new();
        }
        let m = shortlist.max(k);
        // The query is quantised too (to i16, far finer than the codes), so that the scan is an
        // integer multiply-add, which vectorises to twice the width of the f32 one.
        let query_abs = query.iter().fold(0f32, |m, v| m.max(v.abs()));
        let query_scale = if query_abs > 0.0 { query_abs / 32767.0 } else { 1.0 };
        let query_codes: Vec<i16> = query.iter().map(|v| (v / query_scale).round().clamp(-32767.0, 32767.0) as i16).collect();
        let approx = top_k_by(bias.len(), m, excluded, threads, &|start, out: &mut [f32]| {
            let end = start + out.len();
            qscores_into(&query_codes, query_scale, &self.codes[start * dim..end * dim], &self.scales[start..end], &bias[start..end], out)
        });
        let mut exact = TopK::new(k);
        let mut score = [0f32];
        for c in &approx {
            let i = c.item as usize;
            scores_into(query, &embedding[i * dim..(i + 1) * dim], &bias[i..i + 1], &mut score);
            exact.offer(Candidate { item: c.item, score: score[0] });
        }
        let exact = exact.into_sorted();
        if approx.len() < m {
            // The short list holds every item that is not excluded.
            return exact;
        }
        let norm1: f32 = query.iter().map(|v| v.abs()).sum();
        let max_bias = bias.iter().fold(0f32, |m, v| m.max(v.abs()));
        // |e·x − s·(c·x̂)| ≤ Σ|e − s·c|·|x| + Σ|s·c|·|x − x̂| with |e − s·c| ≤ s/2 and
        // |x − x̂| ≤ query_scale/2 per element.
        let bound = self.max_scale / 2.0 * norm1
            + (self.max_abs + self.max_scale / 2.0) * query_scale / 2.0 * dim as f32
            + ROUNDING_SLACK * (norm1 * self.max_abs + max_bias);
        let last_approx = approx.last().map_or(f32::NEG_INFINITY, |c| c.score);
        match exact.get(k - 1) {
            Some(kth) if last_approx + bound < kth.score => exact,
            _ => top_k(query, embedding, bias, k, excluded, threads),
        }
    }
}

/// `out[i] = scales[i] · query_scale · (codes[i] · query) + bias[i]`, the dot product in i32.
fn qscores_into(query: &[i16], query_scale: f32, codes: &[i8], scales: &[f32], bias: &[f32], out: &mut [f32]) {
    assert_eq!(codes.len(), out.len() * query.len());
    assert_eq!(scales.len(), out.len());
    assert_eq!(bias.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { qscores_avx2(query, query_scale, codes, scales, bias, out) };
            return;
        }
    }
    qscores_generic(query, query_scale, codes, scales, bias, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn qscores_avx2(query: &[i16], query_scale: f32, codes: &[i8], scales: &[f32], bias: &[f32], out: &mut [f32]) {
    qscores_generic(query, query_scale, codes, scales, bias, out)
}

#[inline(always)]
fn qscores_generic(query: &[i16], query_scale: f32, codes: &[i8], scales: &[f32], bias: &[f32], out: &mut [f32]) {
    const LANES: usize = 16;
    let dim = query.len();
    let head = dim / LANES * LANES;
    for (((row, &scale), &b), o) in codes.chunks_exact(dim).zip(scales).zip(bias).zip(out.iter_mut()) {
        // |code · query| ≤ 64 · 127 · 32767 per 64 terms: i32 holds it for rows up to ~8000 wide.
        let mut acc = [0i32; LANES];
        for (c, q) in row[..head].chunks_exact(LANES).zip(query[..head].chunks_exact(LANES)) {
            for i in 0..LANES {
                acc[i] += c[i] as i32 * q[i] as i32;
            }
        }
        let tail: i32 = row[head..].iter().zip(&query[head..]).map(|(&c, &q)| c as i32 * q as i32).sum();
        *o = scale * query_scale * (acc.iter().sum::<i32>() + tail) as f32 + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn equals_the_f32_ranking_with_exclusions_threads_and_a_forced_fallback() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (n, dim) = (20_000, 64);
        let embedding: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-0.05..0.05)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.01..0.01)).collect();
        let q = QuantizedEmbedding::new(&embedding, dim);
        assert_eq!(q.bytes(), n * dim + 4 * n);
        for trial in 0..5 {
            let query: Vec<f32> = (0..dim).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let best = top_k(&query, &embedding, &bias, 30, &[], 1);
            let excluded = vec![best[0].item, best[5].item, (trial * 97 + 3) as u32];
            let want = top_k(&query, &embedding, &bias, 20, &excluded, 1);
            for threads in [1, 2] {
                assert_eq!(q.top_k(&query, &embedding, &bias, 20, &excluded, threads, 256), want, "trial {trial}");
            }
            // A short list of exactly k is usually not provably enough: the fallback answers.
            assert_eq!(q.top_k(&query, &embedding, &bias, 20, &excluded, 1, 20), want);
        }
    }

    #[test]
    fn small_catalogs_are_answered_from_the_whole_short_list() {
        let embedding = vec![0.0, 0.0, 1.0, 0.5, -1.0, 2.0, 0.25, 0.25];
        let bias = vec![9.0, 0.0, 0.0, 0.1];
        let q = QuantizedEmbedding::new(&embedding, 2);
        let want = top_k(&[1.0, 1.0], &embedding, &bias, 3, &[2], 1);
        assert_eq!(q.top_k(&[1.0, 1.0], &embedding, &bias, 3, &[2], 1, 256), want);
        assert_eq!(want.iter().map(|c| c.item).collect::<Vec<_>>(), vec![1, 3]);
    }
}
