//! The generic attention path (candle ops, any device and dtype; differentiable on request):
//! appending a batch's keys and values to the cache, and grouped-query attention. The fused CPU
//! path is `cpu_kernels::causal_attention`.

use candle_core::Tensor;

use crate::error::Result;
use crate::kv_cache::LayerKv;

/// Appends this batch's keys and values to the cached ones.
pub(super) fn append_kv(past: &LayerKv, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    if past.k.dim(2)? == 0 {
        return Ok((k, v));
    }
    Ok((
        Tensor::cat(&[&past.k, &k], 2)?,
        Tensor::cat(&[&past.v, &v], 2)?,
    ))
}

/// Grouped-query attention. `q` is `(b, heads, tq, d)`, `k`/`v` are `(b, kv_heads, tk, d)`,
/// `mask` is additive `(b, 1, 1, tq, tk)`. Returns `(b, tq, heads * d)`.
///
/// The query heads that share a key/value head are stacked along the row axis, so each group
/// is one matmul against its K/V without materializing repeated K/V tensors.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    nkv: usize,
    tq: usize,
    hd: usize,
    differentiable: bool,
) -> candle_core::Result<Tensor> {
    let (b, nh, _, _) = q.dims4()?;
    let group = nh / nkv;
    let tk = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let q = (q.reshape((b, nkv, group * tq, hd))? * scale)?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nkv, group, tq, tk))?;
    let scores = scores.broadcast_add(mask)?;
    let probs = if differentiable {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.reshape((b, nkv, group * tq, tk))?;
    let out = probs.matmul(v)?; // (b, nkv, group * tq, d)
    out.reshape((b, nh, tq, hd))?
        .transpose(1, 2)?
        .reshape((b, tq, nh * hd))
}
