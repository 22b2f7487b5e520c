//! Fused f32 CPU kernels for the inference forward pass.
//!
//! Profiling the prefill of the 623-token ranking prompt with candle's generic ops showed a
//! third of the time outside matrix multiplication: scalar `expf` in SiLU and softmax, the
//! zero-filled score tensors and the mask broadcast over all query/key pairs, and the copies
//! between head layouts. These kernels remove that: attention skips the keys a causal query
//! cannot see (about half of the score matrix in a prefill), applies the padding mask and
//! softmax in place, and writes straight into the layout the output projection reads; SwiGLU
//! and RoPE are one pass each. They have no backward pass: training uses the generic path.

use std::cell::RefCell;

use candle_core::{CpuStorage, Device, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::error::{RankerError, Result};

/// Query rows per attention task: small enough that causal skipping saves most of the upper
/// triangle, large enough that each gemm stays efficient.
const QUERY_BLOCK: usize = 64;

/// `exp(x)` to within a few ulp (Cephes' `expf` polynomial), written so that loops over slices
/// vectorize; inputs are clamped to the normal range.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer with plain float ops
    // (`round` would be a libm call on baseline x86-64 and stop vectorization).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// True when the CPU has AVX2 and FMA (the crate is built for baseline x86-64, so hot loops
/// are compiled twice and picked at run time).
#[inline(always)]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs an AVX2+FMA build of the `#[inline(always)]` function `$body`
/// when the CPU supports it and the baseline build otherwise.
macro_rules! simd_dispatch {
    ($vis:vis $name:ident, $avx2:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $body($($arg),*)
        }

        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the features were detected at run time.
                return unsafe { $avx2($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Largest element, with 8 independent lanes so the loop vectorizes.
#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    rest.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Sum with 8 independent lanes so the loop vectorizes.
#[inline(always)]
fn sum_of(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    rest.iter().chain(&acc).sum()
}

/// In-place softmax of `row[..limit]` over the keys where `valid` is true (all when `None`),
/// zeroing the rest of the row. `always` is a key that is kept even if marked invalid (the
/// query's own position, so a padding query's row stays finite).
#[inline(always)]
pub(crate) fn masked_softmax(row: &mut [f32], limit: usize, valid: Option<&[bool]>, always: usize) {
    let (live, dead) = row.split_at_mut(limit);
    dead.fill(0.0);
    if let Some(valid) = valid {
        for (k, x) in live.iter_mut().enumerate() {
            if !valid[k] && k != always {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let max = max_of(live);
    for x in live.iter_mut() {
        *x = fast_exp(*x - max);
    }
    if let Some(valid) = valid {
        // fast_exp clamps, so a masked key came out as exp(-87), not 0.
        for (k, x) in live.iter_mut().enumerate() {
            if !valid[k] && k != always {
                *x = 0.0;
            }
        }
    }
    let inv = 1.0 / sum_of(live);
    live.iter_mut().for_each(|x| *x *= inv);
}

/// Softmax of every `width`-wide row of a query block's scores; row `r` is query
/// `first + r`, which sees keys up to and including `first + r`.
#[inline(always)]
fn softmax_block(scores: &mut [f32], width: usize, first: usize, valid: Option<&[bool]>) {
    for (r, row) in scores.chunks_exact_mut(width).enumerate() {
        let own = first + r;
        masked_softmax(row, own + 1, valid, own);
    }
}

simd_dispatch!(softmax_block_best, softmax_block_avx2, softmax_block,
    (scores: &mut [f32], width: usize, first: usize, valid: Option<&[bool]>));

/// `out = silu(gate) * up`, elementwise.
#[inline(always)]
fn swiglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + fast_exp(-g)) * u;
    }
}

simd_dispatch!(swiglu_row_best, swiglu_row_avx2, swiglu_row,
    (out: &mut [f32], gate: &[f32], up: &[f32]));

/// Runs `f` on the f32 data of a contiguous CPU tensor, without copying it.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| RankerError::InvalidModel("fused kernel: non-contiguous input".into()))?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Ok(f(&data[start..end])),
        _ => Err(RankerError::InvalidModel(
            "fused kernel: expected f32 on CPU".into(),
        )),
    }
}

/// Logits `(rows, vocab)` of f32 hidden states `(rows, hidden)` against a contiguous bf16 CPU
/// table `(vocab, hidden)` (a bf16-packed model's tied output head), widening each table row
/// as it is read: a bandwidth-bound pass over the 2-byte table, where candle's bf16 matmul
/// made generation ~3x slower per token.
pub(crate) fn logits_against_bf16_rows(hidden: &Tensor, table: &Tensor) -> Result<Tensor> {
    let (rows, width) = hidden.dims2()?;
    let (vocab, table_width) = table.dims2()?;
    if width != table_width {
        return Err(RankerError::InvalidModel(format!("hidden width {width} against a head of width {table_width}")));
    }
    let hidden = hidden.contiguous()?;
    let (storage, layout) = table.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| RankerError::InvalidModel("bf16 head: non-contiguous".into()))?;
    let Storage::Cpu(CpuStorage::BF16(data)) = &*storage else {
        return Err(RankerError::InvalidModel("bf16 head: expected bf16 on CPU".into()));
    };
    let table = &data[start..end];
    let mut out = vec![0f32; rows * vocab];
    with_f32(&hidden, |h| {
        // Vocabulary-major so each table row is read once for all hidden rows.
        let mut by_token = vec![0f32; vocab * rows];
        by_token.par_chunks_mut(rows).zip(table.par_chunks(width)).for_each(|(dst, row)| {
            for (r, d) in dst.iter_mut().enumerate() {
                *d = dot_bf16(&h[r * width..(r + 1) * width], row);
            }
        });
        for (t, col) in by_token.chunks(rows).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * vocab + t] = *v;
            }
        }
    })?;
    Ok(Tensor::from_vec(out, (rows, vocab), hidden.device())?)
}

/// `a · b` with `b` in bf16, in 16 independent lanes so the compiler vectorizes it.
fn dot_bf16(a: &[f32], b: &[half::bf16]) -> f32 {
    let mut acc = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16.remainder().iter().zip(b16.remainder()).map(|(x, y)| x * y.to_f32()).sum();
    for (x, y) in a16.zip(b16) {
        for l in 0..16 {
            // bf16 is the high half of an f32.
            acc[l] += x[l] * f32::from_bits((y[l].to_bits() as u32) << 16);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A raw output pointer shared by rayon tasks that write disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: every task writes a region no other task touches (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method (not field access) so closures capture the `Send` wrapper, not the raw pointer.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Splits the fused QKV projection output `(b * t, (nh + 2 nkv) * d)` into RoPE-rotated
/// queries `(b * t, nh * d)` (the row layout attention writes its output in), and keys and
/// values `(b, nkv, t, d)` (the KV-cache layout), keys rotated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn split_qkv_rope(
    qkv: &Tensor,
    (b, t): (usize, usize),
    (nh, nkv, hd): (usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
) -> Result<(Tensor, Tensor, Tensor)> {
    with_f32(qkv, |src| {
        split_qkv_rope_slices(src, (b, t), (nh, nkv, hd), cos, sin, positions)
    })?
}

fn split_qkv_rope_slices(
    src: &[f32],
    (b, t): (usize, usize),
    (nh, nkv, hd): (usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
) -> Result<(Tensor, Tensor, Tensor)> {
    let width = (nh + 2 * nkv) * hd;
    let half = hd / 2;
    let rotate = |x: &[f32], out: &mut [f32], pos: u32| {
        let c = &cos[pos as usize * half..][..half];
        let s = &sin[pos as usize * half..][..half];
        for i in 0..half {
            let (a, bb) = (x[i], x[i + half]);
            out[i] = a * c[i] - bb * s[i];
            out[i + half] = a * s[i] + bb * c[i];
        }
    };
    let mut q = vec![0f32; b * t * nh * hd];
    q.par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(row, out)| {
            let x = &src[row * width..][..nh * hd];
            for h in 0..nh {
                rotate(&x[h * hd..][..hd], &mut out[h * hd..][..hd], positions[row]);
            }
        });
    let mut k = vec![0f32; b * nkv * t * hd];
    let mut v = vec![0f32; b * nkv * t * hd];
    for bi in 0..b {
        for ti in 0..t {
            let row = bi * t + ti;
            let x = &src[row * width..][..width];
            for j in 0..nkv {
                let dst = ((bi * nkv + j) * t + ti) * hd;
                rotate(
                    &x[(nh + j) * hd..][..hd],
                    &mut k[dst..dst + hd],
                    positions[row],
                );
                v[dst..dst + hd].copy_from_slice(&x[(nh + nkv + j) * hd..][..hd]);
            }
        }
    }
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(q, (b * t, nh * hd), &dev)?,
        Tensor::from_vec(k, (b, nkv, t, hd), &dev)?,
        Tensor::from_vec(v, (b, nkv, t, hd), &dev)?,
    ))
}

/// Shapes and masking of one attention call.
pub(crate) struct AttentionShape<'a> {
    pub batch: usize,
    /// Query positions per row (the new tokens).
    pub len: usize,
    /// Cached positions per row before the new tokens.
    pub cached: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per row, whether each of the `cached + len` key positions is a real token.
    pub valid: &'a [Vec<bool>],
    /// Only the last query of each row is needed (its output is `(b, nh * d)`).
    pub last_only: bool,
}

/// Causal grouped-query attention. `q` is `(b * len, nh * d)`, `k`/`v` are
/// `(b, nkv, cached + len, d)`; returns `(b * rows, nh * d)` with `rows` = `len` (or 1 with
/// `last_only`), ready for the output projection.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: &AttentionShape,
) -> Result<Tensor> {
    with_f32(q, |q| {
        with_f32(k, |k| with_f32(v, |v| attention_slices(q, k, v, s)))
    })???
}

fn attention_slices(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape) -> Result<Tensor> {
    let (b, t, p, nh, nkv, hd) = (s.batch, s.len, s.cached, s.heads, s.kv_heads, s.head_dim);
    let tk = p + t;
    let group = nh / nkv;
    if q.len() != b * t * nh * hd || k.len() != b * nkv * tk * hd || v.len() != k.len() {
        return Err(RankerError::InvalidModel(
            "attention: inconsistent shapes".into(),
        ));
    }
    let first_query = if s.last_only { t - 1 } else { 0 };
    let rows = t - first_query;
    let blocks = rows.div_ceil(QUERY_BLOCK);
    let all_valid: Vec<bool> = s.valid.iter().map(|r| r.iter().all(|x| *x)).collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; b * rows * nh * hd];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let row_stride = nh * hd;

    thread_local! {
        static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    (0..b * nh * blocks).into_par_iter().for_each(|task| {
        let (bi, rest) = (task / (nh * blocks), task % (nh * blocks));
        let (h, blk) = (rest / blocks, rest % blocks);
        let j = h / group;
        let start = first_query + blk * QUERY_BLOCK;
        let end = (start + QUERY_BLOCK).min(t);
        let n = end - start;
        // Causal: the block's last query sees keys up to its own position.
        let kv_end = p + end;
        let q_blk = &q[(bi * t + start) * row_stride + h * hd..];
        let k_head = &k[(bi * nkv + j) * tk * hd..];
        let v_head = &v[(bi * nkv + j) * tk * hd..];
        let out_row0 = (bi * rows + (start - first_query)) * row_stride + h * hd;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            scores.resize(n * kv_end, 0.0);
            // SAFETY: pointers and strides describe in-bounds matrices: q rows (n x hd) at
            // stride row_stride, K^T (hd x kv_end) from rows of K, scores (n x kv_end); this
            // task alone writes rows start..end, columns h*hd..(h+1)*hd of `out`.
            unsafe {
                gemm(
                    n,
                    kv_end,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    kv_end as isize,
                    false,
                    q_blk.as_ptr(),
                    1,
                    row_stride as isize,
                    k_head.as_ptr(),
                    hd as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            let valid = (!all_valid[bi]).then(|| &s.valid[bi][..]);
            softmax_block_best(&mut scores, kv_end, p + start, valid);
            unsafe {
                gemm(
                    n,
                    hd,
                    kv_end,
                    out_ptr.ptr().add(out_row0),
                    1,
                    row_stride as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    kv_end as isize,
                    v_head.as_ptr(),
                    1,
                    hd as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    });
    Ok(Tensor::from_vec(out, (b * rows, nh * hd), &Device::Cpu)?)
}

/// `silu(gate) * up` for the fused gate/up output `(n, 2 * inter)`; returns `(n, inter)`.
pub(crate) fn swiglu(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    with_f32(gate_up, |src| swiglu_slices(src, inter))?
}

fn swiglu_slices(src: &[f32], inter: usize) -> Result<Tensor> {
    let n = src.len() / (2 * inter);
    let mut out = vec![0f32; n * inter];
    out.par_chunks_mut(inter)
        .zip(src.par_chunks(2 * inter))
        .for_each(|(o, x)| {
            let (g, u) = x.split_at(inter);
            swiglu_row_best(o, g, u);
        });
    Ok(Tensor::from_vec(out, (n, inter), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((fast_exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert!((fast_exp(-1000.0) - (-87f32).exp()).abs() < 1e-40);
    }

    #[test]
    fn masked_softmax_ignores_invalid_and_future_keys() {
        let mut row = vec![1.0, 2.0, 3.0, 4.0, 5.0];
        let valid = [false, true, true, true, true];
        masked_softmax(&mut row, 3, Some(&valid), 2);
        let e = [2f32.exp(), 3f32.exp()];
        let sum = e[0] + e[1];
        let want = [0.0, e[0] / sum, e[1] / sum, 0.0, 0.0];
        for (a, b) in row.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn logits_against_a_bf16_table_match_the_f32_product_of_the_same_values() {
        // 3 hidden rows, 37 tokens, width 40 (not a multiple of 16: the tail path runs too).
        let (rows, vocab, width) = (3, 37, 40);
        let h: Vec<f32> = (0..rows * width).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let t: Vec<f32> = (0..vocab * width).map(|i| ((i * 11 % 17) as f32 - 8.0) / 3.0).collect();
        let hidden = Tensor::from_vec(h, (rows, width), &Device::Cpu).unwrap();
        let table = Tensor::from_vec(t, (vocab, width), &Device::Cpu).unwrap().to_dtype(candle_core::DType::BF16).unwrap();
        let got = logits_against_bf16_rows(&hidden, &table).unwrap();
        let want = hidden.matmul(&table.to_dtype(candle_core::DType::F32).unwrap().t().unwrap()).unwrap();
        assert_eq!(got.dims(), &[rows, vocab]);
        let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-3, "max difference {diff}");
    }
}
