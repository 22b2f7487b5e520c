//! Elementwise pieces of the step (RMSNorm, SwiGLU, softmax and RoPE, forwards and backwards)
//! and the query-block layout of the attention probabilities.

use rayon::prelude::*;

use crate::cpu_kernels::{fast_exp, has_avx2_fma, simd_dispatch};

/// Query rows per attention task (as in the inference kernels): most of the upper triangle is
/// skipped while each product stays large enough to be efficient.
const QUERY_BLOCK: usize = 64;

/// `y = x * rstd * w` per row; returns the reciprocal std of every row.
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut Vec<f32>) {
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
pub(super) fn rms_norm_backward(x: &[f32], rstd: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], add: bool) {
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
pub(super) fn swiglu_forward_row(act: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
        *a = g / (1.0 + fast_exp(-g)) * u;
    }
}

simd_dispatch!(pub(super) swiglu_forward_best, swiglu_forward_avx2, swiglu_forward_row,
    (act: &mut [f32], gate: &[f32], up: &[f32]));

/// Gradients of `[gate | up]` for one row, given the gradient of `silu(gate) * up`.
#[inline(always)]
pub(super) fn swiglu_backward_row(dgu: &mut [f32], gu: &[f32], dact: &[f32]) {
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

simd_dispatch!(pub(super) swiglu_backward_best, swiglu_backward_avx2, swiglu_backward_row,
    (dgu: &mut [f32], gu: &[f32], dact: &[f32]));

/// `ds = p * (dp - rowdot)`, the softmax backward of one row.
#[inline(always)]
pub(super) fn softmax_backward_row(dp: &mut [f32], p: &[f32], rowdot: f32) {
    for (d, p) in dp.iter_mut().zip(p) {
        *d = p * (*d - rowdot);
    }
}

simd_dispatch!(pub(super) softmax_backward_best, softmax_backward_avx2, softmax_backward_row,
    (dp: &mut [f32], p: &[f32], rowdot: f32));

/// HF's half-split RoPE of one head vector at one position; `sign = -1` applies the inverse
/// rotation (the backward of a rotation is its transpose).
#[inline(always)]
pub(super) fn rotate(x: &mut [f32], c: &[f32], s: &[f32], sign: f32) {
    let half = c.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        let si = sign * s[i];
        x[i] = a * c[i] - b * si;
        x[i + half] = a * si + b * c[i];
    }
}

/// Query blocks `(start, end)` of rows `q_from..t`.
pub(super) fn query_blocks(q_from: usize, t: usize) -> Vec<(usize, usize)> {
    (q_from..t)
        .step_by(QUERY_BLOCK)
        .map(|s| (s, (s + QUERY_BLOCK).min(t)))
        .collect()
}

/// Offset of each query block's probabilities inside one head's buffer, and the head's size.
pub(super) fn prob_offsets(blocks: &[(usize, usize)]) -> (Vec<usize>, usize) {
    let mut off = Vec::with_capacity(blocks.len());
    let mut total = 0;
    for &(s, e) in blocks {
        off.push(total);
        total += (e - s) * e;
    }
    (off, total)
}

