//! One LoRA training example on the CPU in f32, with a hand-derived backward pass.
//!
//! Why not candle's autograd: on the ~600-token ranking prompt it spent ~6.5x the forward's
//! time in the backward (where ~1.2x is what the arithmetic needs), most of it outside matrix
//! products: gigabytes of short-lived tensors (page faults: half of the step was sys time), a
//! full score matrix per head with the mask broadcast over it, transposes and copies between
//! head layouts, and single-threaded elementwise ops. This step does what the arithmetic needs:
//!
//! - the forward keeps only what the backward reads, in buffers reused across examples;
//! - a frozen projection costs one GEMM backwards (the input's gradient, never the weight's);
//! - attention, forwards and backwards, skips the keys a causal query cannot see;
//! - the loss reads the last position only, so the last block runs its queries, output
//!   projection and feed-forward layer for that row alone, in both directions;
//! - block 0's input gradient, which nothing trainable reads, is not computed.
//!
//! It computes the same function as [`super::example_loss`] on a model with
//! [`crate::Kernels::Differentiable`] (same LoRA dropout masks for the same seed), which the
//! tests check against candle's autograd and against finite differences.

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::LossKind;
use crate::config::LlamaConfig;
use crate::cpu_kernels::{fast_exp, has_avx2_fma, masked_softmax, simd_dispatch, SharedMut};
use crate::llama::Llama;
use crate::lora::{LoraDropout, Projection};
use crate::weights::Linear;

/// Query rows per attention task (as in the inference kernels): most of the upper triangle is
/// skipped while each product stays large enough to be efficient.
const QUERY_BLOCK: usize = 64;

/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// One LoRA pair as plain f32 matrices.
#[derive(Debug, Clone)]
pub struct PairF32 {
    /// `(r, in)`, row-major.
    pub a: Vec<f32>,
    /// `(out, r)`, row-major.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `alpha / r`.
    pub scale: f32,
}

/// Gradients of one pair, shaped like [`PairF32`]'s matrices.
#[derive(Debug, Clone)]
pub struct PairGrad {
    /// `dL/dA`, `(r, in)`.
    pub a: Vec<f32>,
    /// `dL/dB`, `(out, r)`.
    pub b: Vec<f32>,
}

/// The trainable adapter as plain f32 matrices, keyed like [`crate::LoraAdapter`].
pub type LoraF32 = HashMap<(usize, Projection), PairF32>;

/// The frozen weights of one block, f32 row-major `(out, in)`.
struct BlockF32 {
    attn_norm: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

/// What the forward of one LoRA pair keeps for the backward.
#[derive(Default)]
struct LoraSaved {
    /// The pair's (dropped-out) input `(rows, in)`.
    z: Vec<f32>,
    /// Its dropout mask `(rows, in)`; empty without dropout.
    mask: Vec<f32>,
    /// `z A^T`, `(rows, r)`.
    u: Vec<f32>,
}

/// What the forward of one block keeps for the backward (buffers reused across examples).
#[derive(Default)]
struct BlockSaved {
    /// First query row this block computes attention for (the last block: the answer row).
    q_from: usize,
    /// Block input `(t, hidden)` and its RMSNorm reciprocal std `(t)`.
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    /// RoPE-rotated queries `(t, heads * d)`; keys `(kv_heads, t, d)` rotated; values.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities per head, query blocks stored back to back, each block
    /// `(rows, keys it can see)`.
    probs: Vec<f32>,
    /// Attention output `(rows_out, heads * d)`.
    attn: Vec<f32>,
    /// Residual after attention `(rows_out, hidden)` and its RMSNorm reciprocal std.
    x_mid: Vec<f32>,
    rstd2: Vec<f32>,
    /// Gate and up projections `(rows_out, 2 * intermediate)`.
    gate_up: Vec<f32>,
    /// LoRA inputs per projection (absent projections have no entry).
    lora: HashMap<Projection, LoraSaved>,
}

/// The hand-derived training step over a model's frozen f32 weights.
pub struct NativeStep {
    cfg: LlamaConfig,
    blocks: Vec<BlockF32>,
    final_norm: Vec<f32>,
    /// `(vocab, hidden)`, the model's tensor (only one row of logits is ever computed).
    lm_head: Tensor,
    embed: Tensor,
    cos: Vec<f32>,
    sin: Vec<f32>,
    saved: Vec<BlockSaved>,
}

/// The loss of one example and the gradients of every pair of the adapter.
pub struct StepOutput {
    /// Cross-entropy of the answer (before any scaling).
    pub loss: f64,
    /// `d(loss * loss_scale)/d(pair)` for every pair of the adapter.
    pub grads: HashMap<(usize, Projection), PairGrad>,
}

fn dense_f32(l: &Linear, what: &str) -> Result<Vec<f32>> {
    match l {
        Linear::Dense(w) => Ok(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
        _ => {
            bail!("native training step: {what} is not a dense weight (load the model dequantized)")
        }
    }
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn parallelism(macs: usize) -> Parallelism {
    if macs >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// A strided read-only matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `(rows, cols)` with row stride `rs`.
    fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    fn t(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm {what}: operand out of bounds");
        }
    }
}

/// `dst (m, n)` (row-major, row stride `dst_rs`) `= [dst +] alpha * lhs (m, k) rhs (k, n)`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm dst: out of bounds");
    // SAFETY: the three operands were bounds-checked above for the given strides, `dst` is
    // borrowed mutably and does not alias the shared operands.
    unsafe {
        gemm_ptr(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            lhs,
            rhs,
            alpha,
            parallelism(m * n * k),
        )
    }
}

/// `y = x * rstd * w` per row; returns the reciprocal std of every row.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut Vec<f32>) {
    let h = w.len();
    rstd.clear();
    rstd.resize(x.len() / h, 0.0);
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter_mut())
        .for_each(|((y, x), r)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * *r * w;
            }
        });
}

/// `dx [+]= d/dx (x * rstd * w) . dy` per row.
fn rms_norm_backward(x: &[f32], rstd: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
    let h = w.len();
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(dy.par_chunks(h))
        .zip(rstd.par_iter())
        .for_each(|(((dx, x), dy), &r)| {
            let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| x * dy * w).sum();
            let c = r * r * r * dot / h as f32;
            for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                let g = r * w * dy - c * x;
                *dx = if add { *dx + g } else { g };
            }
        });
}

/// `act = silu(gate) * up` for one row of `[gate | up]`.
#[inline(always)]
fn swiglu_forward_row(act: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
        *a = g / (1.0 + fast_exp(-g)) * u;
    }
}

simd_dispatch!(swiglu_forward_best, swiglu_forward_avx2, swiglu_forward_row,
    (act: &mut [f32], gate: &[f32], up: &[f32]));

/// Gradients of `[gate | up]` for one row, given the gradient of `silu(gate) * up`.
#[inline(always)]
fn swiglu_backward_row(dgu: &mut [f32], gu: &[f32], dact: &[f32]) {
    let inter = dact.len();
    let (dg, du) = dgu.split_at_mut(inter);
    let (g, u) = gu.split_at(inter);
    for i in 0..inter {
        let s = 1.0 / (1.0 + fast_exp(-g[i]));
        let silu = g[i] * s;
        du[i] = dact[i] * silu;
        dg[i] = dact[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

simd_dispatch!(swiglu_backward_best, swiglu_backward_avx2, swiglu_backward_row,
    (dgu: &mut [f32], gu: &[f32], dact: &[f32]));

/// `ds = p * (dp - rowdot)`, the softmax backward of one row.
#[inline(always)]
fn softmax_backward_row(dp: &mut [f32], p: &[f32], rowdot: f32) {
    for (d, p) in dp.iter_mut().zip(p) {
        *d = p * (*d - rowdot);
    }
}

simd_dispatch!(softmax_backward_best, softmax_backward_avx2, softmax_backward_row,
    (dp: &mut [f32], p: &[f32], rowdot: f32));

/// HF's half-split RoPE of one head vector at one position; `sign = -1` applies the inverse
/// rotation (the backward of a rotation is its transpose).
#[inline(always)]
fn rotate(x: &mut [f32], c: &[f32], s: &[f32], sign: f32) {
    let half = c.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        let si = sign * s[i];
        x[i] = a * c[i] - b * si;
        x[i + half] = a * si + b * c[i];
    }
}

/// Query blocks `(start, end)` of rows `q_from..t`.
fn query_blocks(q_from: usize, t: usize) -> Vec<(usize, usize)> {
    (q_from..t)
        .step_by(QUERY_BLOCK)
        .map(|s| (s, (s + QUERY_BLOCK).min(t)))
        .collect()
}

/// Offset of each query block's probabilities inside one head's buffer, and the head's size.
fn prob_offsets(blocks: &[(usize, usize)]) -> (Vec<usize>, usize) {
    let mut off = Vec::with_capacity(blocks.len());
    let mut total = 0;
    for &(s, e) in blocks {
        off.push(total);
        total += (e - s) * e;
    }
    (off, total)
}

impl NativeStep {
    /// Copies the frozen block weights of `model` (dense, any float dtype) as f32.
    pub fn new(model: &Llama) -> Result<Self> {
        if !model.device().is_cpu() {
            bail!("the native training step runs on the CPU");
        }
        let w = model.weights();
        let blocks = w
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(BlockF32 {
                    attn_norm: vec_f32(&b.attn_norm)?,
                    qkv: dense_f32(&b.qkv, &format!("block {i} qkv"))?,
                    o: dense_f32(&b.o, &format!("block {i} o"))?,
                    ffn_norm: vec_f32(&b.ffn_norm)?,
                    gate_up: dense_f32(&b.gate_up, &format!("block {i} gate_up"))?,
                    down: dense_f32(&b.down, &format!("block {i} down"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = model.rope_tables();
        let cfg = model.config().clone();
        Ok(Self {
            saved: (0..cfg.num_layers).map(|_| BlockSaved::default()).collect(),
            cfg,
            blocks,
            final_norm: vec_f32(&w.final_norm)?,
            lm_head: w.lm_head.to_dtype(DType::F32)?,
            embed: w.embed.to_dtype(DType::F32)?,
            cos: cos.to_vec(),
            sin: sin.to_vec(),
        })
    }

    /// The loss of the prompt `ids` whose answer is candidate `label` (letters `letters`), and
    /// the gradients of `loss * loss_scale` with respect to every pair of `lora`. `dropout` is
    /// `(p, seed)` of the LoRA dropout, drawn as [`crate::LoraAdapter::set_dropout`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &mut self,
        lora: &LoraF32,
        dropout: Option<(f32, u64)>,
        ids: &[u32],
        letters: &[u32],
        label: usize,
        loss: LossKind,
        loss_scale: f32,
    ) -> Result<StepOutput> {
        let t = ids.len();
        if t == 0 || t > self.cfg.max_seq_len {
            bail!(
                "prompt of {t} tokens (1..={} allowed)",
                self.cfg.max_seq_len
            );
        }
        if label >= letters.len() {
            bail!("label {label} out of {} letters", letters.len());
        }
        for ((layer, proj), p) in lora {
            let (din, dout) = proj.dims(&self.cfg);
            if *layer >= self.cfg.num_layers || p.a.len() != p.r * din || p.b.len() != dout * p.r {
                bail!("LoRA pair of block {layer} {proj:?} does not fit the model");
            }
        }
        let mut drop = dropout
            .filter(|(p, _)| *p > 0.0)
            .map(|(p, seed)| LoraDropout::new(p, seed));
        let h = self.cfg.hidden_size;
        let idx = Tensor::from_slice(ids, t, self.embed.device())?;
        let mut x: Vec<f32> = self.embed.index_select(&idx, 0)?.flatten_all()?.to_vec1()?;
        let layers = self.cfg.num_layers;
        for l in 0..layers {
            let q_from = if l + 1 == layers { t - 1 } else { 0 };
            x = self.block_forward(l, x, t, q_from, lora, drop.as_mut());
        }
        // `x` is the last row only now.
        let eps = self.cfg.rms_norm_eps as f32;
        let mut hf = vec![0f32; h];
        let mut rstd_f = Vec::new();
        rms_norm(&x, &self.final_norm, eps, &mut hf, &mut rstd_f);
        let hidden = Tensor::from_slice(&hf, (1, h), self.lm_head.device())?;
        let (head, target) = match loss {
            LossKind::AnswerToken => (self.lm_head.clone(), letters[label] as usize),
            LossKind::Letters => {
                let li = Tensor::from_slice(letters, letters.len(), self.lm_head.device())?;
                (self.lm_head.index_select(&li, 0)?, label)
            }
        };
        let logits: Vec<f32> = hidden.matmul(&head.t()?)?.flatten_all()?.to_vec1()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        let loss_value = lse - logits[target] as f64;
        let mut dlogits: Vec<f32> = logits
            .iter()
            .map(|&z| ((z as f64 - lse).exp() * loss_scale as f64) as f32)
            .collect();
        dlogits[target] -= loss_scale;
        let dl = Tensor::from_vec(dlogits, (1, head.dim(0)?), head.device())?;
        let dhf: Vec<f32> = dl.matmul(&head)?.flatten_all()?.to_vec1()?;
        let mut dx = vec![0f32; h];
        rms_norm_backward(&x, &rstd_f, &self.final_norm, &dhf, &mut dx, false);

        let mut grads = HashMap::new();
        for l in (0..layers).rev() {
            dx = self.block_backward(l, &dx, t, lora, &mut grads);
        }
        Ok(StepOutput {
            loss: loss_value,
            grads,
        })
    }

    /// Adds `scale * (z A^T) B^T` of the pair `(layer, proj)` (if any) to `y` (columns
    /// `col..col + out` of rows with stride `y_rs`), where `z` is `x` under dropout; keeps `z`,
    /// the mask and `z A^T` for the backward.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward(
        saved: &mut HashMap<Projection, LoraSaved>,
        lora: &LoraF32,
        layer: usize,
        proj: Projection,
        cfg: &LlamaConfig,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        y_rs: usize,
        col: usize,
        drop: Option<&mut LoraDropout>,
    ) {
        let Some(p) = lora.get(&(layer, proj)) else {
            saved.remove(&proj);
            return;
        };
        let (din, dout) = proj.dims(cfg);
        let s = saved.entry(proj).or_default();
        s.z.clear();
        s.z.extend_from_slice(&x[..rows * din]);
        s.mask.clear();
        if let Some(d) = drop {
            s.mask = d.mask(rows * din);
            s.z.iter_mut().zip(&s.mask).for_each(|(z, m)| *z *= m);
        }
        s.u.resize(rows * p.r, 0.0);
        matmul(
            rows,
            p.r,
            din,
            &mut s.u,
            p.r,
            false,
            Mat::rows(&s.z, din),
            Mat::t(&p.a, din),
            1.0,
        );
        matmul(
            rows,
            dout,
            p.r,
            &mut y[col..],
            y_rs,
            true,
            Mat::rows(&s.u, p.r),
            Mat::t(&p.b, p.r),
            p.scale,
        );
    }

    /// Gradients of the pair `(layer, proj)` (if any) for the output gradient `dy` (columns
    /// `col..col + out`, row stride `dy_rs`); adds the input's gradient through the pair to
    /// `dx` when given.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        saved: &HashMap<Projection, LoraSaved>,
        lora: &LoraF32,
        layer: usize,
        proj: Projection,
        cfg: &LlamaConfig,
        dy: &[f32],
        dy_rs: usize,
        col: usize,
        rows: usize,
        dx: Option<&mut [f32]>,
        grads: &mut HashMap<(usize, Projection), PairGrad>,
    ) {
        let (Some(p), Some(s)) = (lora.get(&(layer, proj)), saved.get(&proj)) else {
            return;
        };
        let (din, dout) = proj.dims(cfg);
        let r = p.r;
        let dy = &dy[col..];
        let mut gb = vec![0f32; dout * r];
        // dB = scale * dy^T u
        matmul(
            dout,
            r,
            rows,
            &mut gb,
            r,
            false,
            Mat::t(dy, dy_rs),
            Mat::rows(&s.u, r),
            p.scale,
        );
        // du = scale * dy B
        let mut du = vec![0f32; rows * r];
        matmul(
            rows,
            r,
            dout,
            &mut du,
            r,
            false,
            Mat::rows(dy, dy_rs),
            Mat::rows(&p.b, r),
            p.scale,
        );
        // dA = du^T z
        let mut ga = vec![0f32; r * din];
        matmul(
            r,
            din,
            rows,
            &mut ga,
            din,
            false,
            Mat::t(&du, r),
            Mat::rows(&s.z, din),
            1.0,
        );
        if let Some(dx) = dx {
            // dx += (du A) * mask
            if s.mask.is_empty() {
                matmul(
                    rows,
                    din,
                    r,
                    dx,
                    din,
                    true,
                    Mat::rows(&du, r),
                    Mat::rows(&p.a, din),
                    1.0,
                );
            } else {
                let mut dz = vec![0f32; rows * din];
                matmul(
                    rows,
                    din,
                    r,
                    &mut dz,
                    din,
                    false,
                    Mat::rows(&du, r),
                    Mat::rows(&p.a, din),
                    1.0,
                );
                dx.iter_mut()
                    .zip(&dz)
                    .zip(&s.mask)
                    .for_each(|((d, z), m)| *d += z * m);
            }
        }
        grads.insert((layer, proj), PairGrad { a: ga, b: gb });
    }

    /// One block forwards on `x` `(t, hidden)`; returns the block's output for rows
    /// `q_from..t`.
    fn block_forward(
        &mut self,
        layer: usize,
        x: Vec<f32>,
        t: usize,
        q_from: usize,
        lora: &LoraF32,
        mut drop: Option<&mut LoraDropout>,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let w = &self.blocks[layer];
        let s = &mut self.saved[layer];
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (qd, kvd, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let width = qd + 2 * kvd;
        let eps = cfg.rms_norm_eps as f32;
        let rows_out = t - q_from;
        s.q_from = q_from;

        let mut h1 = vec![0f32; t * h];
        rms_norm(&x, &w.attn_norm, eps, &mut h1, &mut s.rstd1);
        s.x_in = x;
        let mut qkv = vec![0f32; t * width];
        matmul(
            t,
            width,
            h,
            &mut qkv,
            width,
            false,
            Mat::rows(&h1, h),
            Mat::t(&w.qkv, h),
            1.0,
        );
        for (proj, col) in [
            (Projection::QProj, 0),
            (Projection::KProj, qd),
            (Projection::VProj, qd + kvd),
        ] {
            Self::lora_forward(
                &mut s.lora,
                lora,
                layer,
                proj,
                cfg,
                &h1,
                t,
                &mut qkv,
                width,
                col,
                drop.as_deref_mut(),
            );
        }
        drop_vec(h1);

        // Split, rotate.
        let half = hd / 2;
        s.q.resize(t * qd, 0.0);
        s.k.resize(nkv * t * hd, 0.0);
        s.v.resize(nkv * t * hd, 0.0);
        let (cos, sin) = (&self.cos, &self.sin);
        s.q.par_chunks_mut(qd).enumerate().for_each(|(row, out)| {
            out.copy_from_slice(&qkv[row * width..][..qd]);
            let (c, sn) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            for head in out.chunks_exact_mut(hd) {
                rotate(head, c, sn, 1.0);
            }
        });
        for j in 0..nkv {
            for row in 0..t {
                let src = &qkv[row * width..][..width];
                let dst = (j * t + row) * hd;
                let kk = &mut s.k[dst..dst + hd];
                kk.copy_from_slice(&src[qd + j * hd..][..hd]);
                rotate(
                    kk,
                    &cos[row * half..][..half],
                    &sin[row * half..][..half],
                    1.0,
                );
                s.v[dst..dst + hd].copy_from_slice(&src[qd + kvd + j * hd..][..hd]);
            }
        }
        drop_vec(qkv);

        // Causal attention for queries q_from..t.
        let blocks = query_blocks(q_from, t);
        let (offsets, per_head) = prob_offsets(&blocks);
        s.probs.resize(nh * per_head, 0.0);
        s.attn.resize(rows_out * qd, 0.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        {
            let probs = SharedMut(s.probs.as_mut_ptr());
            let attn = SharedMut(s.attn.as_mut_ptr());
            let (q, k, v) = (&s.q, &s.k, &s.v);
            (0..nh * blocks.len()).into_par_iter().for_each(|task| {
                let (head, bi) = (task / blocks.len(), task % blocks.len());
                let (start, end) = blocks[bi];
                let n = end - start;
                let j = head / group;
                // SAFETY: this task alone writes its block of its head's probabilities.
                let p = unsafe {
                    std::slice::from_raw_parts_mut(
                        probs.ptr().add(head * per_head + offsets[bi]),
                        n * end,
                    )
                };
                let qb = &q[start * qd + head * hd..];
                let kh = &k[j * t * hd..][..t * hd];
                let vh = &v[j * t * hd..][..t * hd];
                matmul_local(n, end, hd, p, end, Mat::rows(qb, qd), Mat::t(kh, hd), scale);
                for (r, row) in p.chunks_exact_mut(end).enumerate() {
                    masked_softmax(row, start + r + 1, None, start + r);
                }
                // SAFETY: rows start..end, columns head*hd..(head+1)*hd of the output are this
                // task's alone and inside the buffer.
                unsafe {
                    gemm_shared(
                        n,
                        hd,
                        end,
                        attn.ptr().add((start - q_from) * qd + head * hd),
                        qd,
                        false,
                        Mat::rows(p, end),
                        Mat::rows(vh, hd),
                        1.0,
                    );
                }
            });
        }

        // Output projection and residual.
        let mut x_mid = vec![0f32; rows_out * h];
        matmul(
            rows_out,
            h,
            qd,
            &mut x_mid,
            h,
            false,
            Mat::rows(&s.attn, qd),
            Mat::t(&w.o, qd),
            1.0,
        );
        Self::lora_forward(
            &mut s.lora,
            lora,
            layer,
            Projection::OProj,
            cfg,
            &s.attn,
            rows_out,
            &mut x_mid,
            h,
            0,
            drop.as_deref_mut(),
        );
        x_mid
            .iter_mut()
            .zip(&s.x_in[q_from * h..])
            .for_each(|(m, x)| *m += x);

        // Feed-forward.
        let mut h2 = vec![0f32; rows_out * h];
        rms_norm(&x_mid, &w.ffn_norm, eps, &mut h2, &mut s.rstd2);
        s.gate_up.resize(rows_out * 2 * inter, 0.0);
        matmul(
            rows_out,
            2 * inter,
            h,
            &mut s.gate_up,
            2 * inter,
            false,
            Mat::rows(&h2, h),
            Mat::t(&w.gate_up, h),
            1.0,
        );
        for (proj, col) in [(Projection::GateProj, 0), (Projection::UpProj, inter)] {
            Self::lora_forward(
                &mut s.lora,
                lora,
                layer,
                proj,
                cfg,
                &h2,
                rows_out,
                &mut s.gate_up,
                2 * inter,
                col,
                drop.as_deref_mut(),
            );
        }
        drop_vec(h2);
        let mut act = vec![0f32; rows_out * inter];
        act.par_chunks_mut(inter)
            .zip(s.gate_up.par_chunks(2 * inter))
            .for_each(|(a, gu)| {
                let (g, u) = gu.split_at(inter);
                swiglu_forward_best(a, g, u);
            });
        let mut out = x_mid.clone();
        matmul(
            rows_out,
            h,
            inter,
            &mut out,
            h,
            true,
            Mat::rows(&act, inter),
            Mat::t(&w.down, inter),
            1.0,
        );
        Self::lora_forward(
            &mut s.lora,
            lora,
            layer,
            Projection::DownProj,
            cfg,
            &act,
            rows_out,
            &mut out,
            h,
            0,
            drop,
        );
        s.x_mid = x_mid;
        out
    }

    /// One block backwards: `dout` is the gradient of its output rows `q_from..t`; returns
    /// the gradient of its input `(t, hidden)` (empty for block 0, which nothing upstream
    /// needs).
    fn block_backward(
        &self,
        layer: usize,
        dout: &[f32],
        t: usize,
        lora: &LoraF32,
        grads: &mut HashMap<(usize, Projection), PairGrad>,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let w = &self.blocks[layer];
        let s = &self.saved[layer];
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (qd, kvd, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let width = qd + 2 * kvd;
        let q_from = s.q_from;
        let rows_out = t - q_from;

        // Feed-forward backwards.
        let mut dact = vec![0f32; rows_out * inter];
        matmul(
            rows_out,
            inter,
            h,
            &mut dact,
            inter,
            false,
            Mat::rows(dout, h),
            Mat::rows(&w.down, inter),
            1.0,
        );
        Self::lora_backward(
            &s.lora,
            lora,
            layer,
            Projection::DownProj,
            cfg,
            dout,
            h,
            0,
            rows_out,
            Some(&mut dact),
            grads,
        );
        let mut dgu = vec![0f32; rows_out * 2 * inter];
        dgu.par_chunks_mut(2 * inter)
            .zip(s.gate_up.par_chunks(2 * inter))
            .zip(dact.par_chunks(inter))
            .for_each(|((d, gu), da)| swiglu_backward_best(d, gu, da));
        drop_vec(dact);
        let mut dh2 = vec![0f32; rows_out * h];
        matmul(
            rows_out,
            h,
            2 * inter,
            &mut dh2,
            h,
            false,
            Mat::rows(&dgu, 2 * inter),
            Mat::rows(&w.gate_up, h),
            1.0,
        );
        for (proj, col) in [(Projection::GateProj, 0), (Projection::UpProj, inter)] {
            Self::lora_backward(
                &s.lora,
                lora,
                layer,
                proj,
                cfg,
                &dgu,
                2 * inter,
                col,
                rows_out,
                Some(&mut dh2),
                grads,
            );
        }
        drop_vec(dgu);
        let mut dmid = dout.to_vec();
        rms_norm_backward(&s.x_mid, &s.rstd2, &w.ffn_norm, &dh2, &mut dmid, true);
        drop_vec(dh2);

        // Output projection backwards.
        let mut dattn = vec![0f32; rows_out * qd];
        matmul(
            rows_out,
            qd,
            h,
            &mut dattn,
            qd,
            false,
            Mat::rows(&dmid, h),
            Mat::rows(&w.o, qd),
            1.0,
        );
        Self::lora_backward(
            &s.lora,
            lora,
            layer,
            Projection::OProj,
            cfg,
            &dmid,
            h,
            0,
            rows_out,
            Some(&mut dattn),
            grads,
        );

        // Attention backwards, one task per head (each with its own key/value gradients).
        let blocks = query_blocks(q_from, t);
        let (offsets, per_head) = prob_offsets(&blocks);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let mut dq = vec![0f32; rows_out * qd];
        let mut dkv_heads = vec![0f32; nh * 2 * t * hd];
        {
            let dq_ptr = SharedMut(dq.as_mut_ptr());
            let (q, k, v, probs, attn) = (&s.q, &s.k, &s.v, &s.probs, &s.attn);
            let dattn = &dattn;
            dkv_heads
                .par_chunks_mut(2 * t * hd)
                .enumerate()
                .for_each(|(head, dkv)| {
                    let (dk, dv) = dkv.split_at_mut(t * hd);
                    let j = head / group;
                    let kh = &k[j * t * hd..][..t * hd];
                    let vh = &v[j * t * hd..][..t * hd];
                    for (bi, &(start, end)) in blocks.iter().enumerate() {
                        let n = end - start;
                        let r0 = start - q_from;
                        let p = &probs[head * per_head + offsets[bi]..][..n * end];
                        let d_o = &dattn[r0 * qd + head * hd..];
                        let o = &attn[r0 * qd + head * hd..];
                        // dV += P^T dO
                        matmul_acc_local(
                            end,
                            hd,
                            n,
                            dv,
                            hd,
                            Mat::t(p, end),
                            Mat::rows(d_o, qd),
                            1.0,
                        );
                        DS.with(|cell| {
                            let mut ds = cell.borrow_mut();
                            ds.resize(n * end, 0.0);
                            // dP = dO V^T, then dS = P (dP - rowsum(dO o O)).
                            matmul_local(
                                n,
                                end,
                                hd,
                                &mut ds,
                                end,
                                Mat::rows(d_o, qd),
                                Mat::t(vh, hd),
                                1.0,
                            );
                            for r in 0..n {
                                let dot: f32 = d_o[r * qd..][..hd]
                                    .iter()
                                    .zip(&o[r * qd..][..hd])
                                    .map(|(a, b)| a * b)
                                    .sum();
                                let lim = start + r + 1;
                                softmax_backward_best(
                                    &mut ds[r * end..][..lim],
                                    &p[r * end..][..lim],
                                    dot,
                                );
                                ds[r * end + lim..(r + 1) * end].fill(0.0);
                            }
                            // dQ = scale dS K; dK += scale dS^T Q.
                            // SAFETY: rows r0..r0+n, columns head*hd..(head+1)*hd of dq are
                            // this task's alone and inside the buffer.
                            unsafe {
                                gemm_shared(
                                    n,
                                    hd,
                                    end,
                                    dq_ptr.ptr().add(r0 * qd + head * hd),
                                    qd,
                                    false,
                                    Mat::rows(&ds, end),
                                    Mat::rows(kh, hd),
                                    scale,
                                );
                            }
                            let qb = &q[start * qd + head * hd..];
                            matmul_acc_local(
                                end,
                                hd,
                                n,
                                dk,
                                hd,
                                Mat::t(&ds, end),
                                Mat::rows(qb, qd),
                                scale,
                            );
                        });
                    }
                });
        }
        drop_vec(dattn);

        // Un-rotate and assemble d[q | k | v] `(t, width)`.
        let half = hd / 2;
        let (cos, sin) = (&self.cos, &self.sin);
        let mut dqkv = vec![0f32; t * width];
        dqkv.par_chunks_mut(width).enumerate().for_each(|(row, d)| {
            let (c, sn) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            if row >= q_from {
                d[..qd].copy_from_slice(&dq[(row - q_from) * qd..][..qd]);
                for head in d[..qd].chunks_exact_mut(hd) {
                    rotate(head, c, sn, -1.0);
                }
            }
            for j in 0..nkv {
                for head in j * group..(j + 1) * group {
                    let src = &dkv_heads[head * 2 * t * hd..];
                    let (dk, dv) = (&src[row * hd..][..hd], &src[(t + row) * hd..][..hd]);
                    let kdst = &mut d[qd + j * hd..][..hd];
                    kdst.iter_mut().zip(dk).for_each(|(a, b)| *a += b);
                    let vdst = &mut d[qd + kvd + j * hd..][..hd];
                    vdst.iter_mut().zip(dv).for_each(|(a, b)| *a += b);
                }
                rotate(&mut d[qd + j * hd..][..hd], c, sn, -1.0);
            }
        });
        drop_vec(dq);
        drop_vec(dkv_heads);

        let need_dx = layer > 0;
        let mut dh1 = if need_dx {
            vec![0f32; t * h]
        } else {
            Vec::new()
        };
        if need_dx {
            matmul(
                t,
                h,
                width,
                &mut dh1,
                h,
                false,
                Mat::rows(&dqkv, width),
                Mat::rows(&w.qkv, h),
                1.0,
            );
        }
        for (proj, col) in [
            (Projection::QProj, 0),
            (Projection::KProj, qd),
            (Projection::VProj, qd + kvd),
        ] {
            let dx = need_dx.then_some(dh1.as_mut_slice());
            Self::lora_backward(
                &s.lora, lora, layer, proj, cfg, &dqkv, width, col, t, dx, grads,
            );
        }
        if !need_dx {
            return Vec::new();
        }
        let mut dx = vec![0f32; t * h];
        rms_norm_backward(&s.x_in, &s.rstd1, &w.attn_norm, &dh1, &mut dx, false);
        dx[q_from * h..]
            .iter_mut()
            .zip(&dmid)
            .for_each(|(d, m)| *d += m);
        dx
    }
}

thread_local! {
    /// Per-thread scratch for one query block's score gradients.
    static DS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Frees a buffer as soon as it is dead (makes the peak memory of a step explicit).
fn drop_vec(v: Vec<f32>) {
    drop(v);
}

/// [`matmul`] on the calling thread (inside tasks that are already parallel).
#[allow(clippy::too_many_arguments)]
fn matmul_local(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    gemm_local(m, n, k, dst, dst_rs, false, lhs, rhs, alpha)
}

/// [`matmul_local`] adding to `dst`.
#[allow(clippy::too_many_arguments)]
fn matmul_acc_local(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    gemm_local(m, n, k, dst, dst_rs, true, lhs, rhs, alpha)
}

#[allow(clippy::too_many_arguments)]
fn gemm_local(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm dst: out of bounds");
    // SAFETY: `dst` was bounds-checked above and is borrowed mutably.
    unsafe {
        gemm_shared(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            lhs,
            rhs,
            alpha,
        )
    }
}

/// [`gemm_local`] into a destination that other tasks write too (disjoint regions).
///
/// # Safety
/// `dst` must be valid for the `(m, n)` matrix with row stride `dst_rs`, and no other thread
/// may touch those elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_shared(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    gemm_ptr(
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        lhs,
        rhs,
        alpha,
        Parallelism::None,
    )
}

/// `dst = [dst +] alpha * lhs rhs` through the `gemm` crate.
///
/// # Safety
/// The operands must be in bounds for their strides (see [`Mat::check`]) and `dst` valid for
/// writes of the `(m, n)` matrix with row stride `dst_rs`, touched by no one else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    par: Parallelism,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        par,
    );
}
