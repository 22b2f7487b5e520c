//! Fused training operations with hand-written gradients: layer norm, exact GELU, softmax
//! cross-entropy and the causal, padding-aware attention softmax.
//!
//! Built from generic candle operations each of these is 6–12 passes over the activations
//! forwards and about twice that backwards, every pass a fresh allocation; on a 2-core CPU they
//! dominated the training step next to the matrix products. Each is one pass here (two for the
//! backward pass), and the tests check them against candle's own operations.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

fn contiguous<'a, T: candle_core::WithDType>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} expects contiguous inputs"),
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// Per-row mean and 1/sqrt(var + eps) of `x` (rows of `dim`).
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s1, l1, "layer norm")?;
        let w = contiguous::<f32>(s2, l2, "layer norm")?;
        let b = contiguous::<f32>(s3, l3, "layer norm")?;
        let dim = w.len();
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let (mean, rstd) = row_stats(row, self.eps);
            for k in 0..dim {
                o[k] = (row[k] - mean) * rstd * w[k] + b[k];
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, gs) = (values(x)?, values(w)?, values(grad)?);
        let dim = ws.len();
        let mut dx = vec![0f32; xs.len()];
        let (mut dw, mut db) = (vec![0f64; dim], vec![0f64; dim]);
        let mut xhat = vec![0f32; dim];
        for ((row, g), d) in xs.chunks_exact(dim).zip(gs.chunks_exact(dim)).zip(dx.chunks_exact_mut(dim)) {
            let (mean, rstd) = row_stats(row, self.eps);
            let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f32, 0f32);
            for k in 0..dim {
                xhat[k] = (row[k] - mean) * rstd;
                let dxhat = g[k] * ws[k];
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * xhat[k];
                dw[k] += (g[k] * xhat[k]) as f64;
                db[k] += g[k] as f64;
            }
            let (m1, m2) = (sum_dxhat / dim as f32, sum_dxhat_xhat / dim as f32);
            for k in 0..dim {
                d[k] = rstd * (g[k] * ws[k] - m1 - xhat[k] * m2);
            }
        }
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(to_f32(dw), dim, x.device())?),
            Some(Tensor::from_vec(to_f32(db), dim, x.device())?),
        ))
    }
}

/// LayerNorm over the last dimension with gain `w` and bias `b` (population variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps: eps as f32 })
}

struct GeluErfOp;

/// Φ(x), the standard normal CDF.
#[inline]
fn phi_cdf(x: f32) -> f32 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(storage, layout, "gelu")?;
        Ok((CpuStorage::F32(x.iter().map(|&v| v * phi_cdf(v)).collect()), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx x Φ(x) = Φ(x) + x φ(x).
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        let dx: Vec<f32> = values(x)?
            .iter()
            .zip(values(grad)?)
            .map(|(&v, g)| g * (phi_cdf(v) + v * inv_sqrt_2pi * (-0.5 * v * v).exp()))
            .collect();
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Exact GELU, x Φ(x) (PyTorch's default `nn.GELU`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErfOp)
}

struct CrossEntropyOp;

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "fused-softmax-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous::<f32>(s1, l1, "cross-entropy")?;
        let targets = contiguous::<u32>(s2, l2, "cross-entropy")?;
        let (rows, classes) = l1.shape().dims2()?;
        if targets.len() != rows {
            candle_core::bail!("cross-entropy has {} targets for {rows} rows", targets.len());
        }
        let losses = logits
            .chunks_exact(classes)
            .zip(targets)
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                max + sum.ln() - row[t as usize]
            })
            .collect();
        Ok((CpuStorage::F32(losses), Shape::from(rows)))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, classes) = logits.dims2()?;
        let mut d = values(logits)?;
        let targets = targets.to_vec1::<u32>()?;
        let grad = values(grad)?;
        for ((row, &t), g) in d.chunks_exact_mut(classes).zip(&targets).zip(grad) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let scale = g / sum;
            for v in row.iter_mut() {
                *v *= scale;
            }
            row[t as usize] -= g;
        }
        Ok((Some(Tensor::from_vec(d, (rows, classes), logits.device())?), None))
    }
}

/// Mean over rows of −log softmax(logits)[target]: `logits` (N, C), `targets` (N) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropyOp)?.mean_all()
}

struct CausalSoftmaxOp {
    /// Per batch row, the first real (non-padding) column.
    first: Vec<usize>,
}

impl CausalSoftmaxOp {
    /// Columns of query row `i` that may be attended to in batch row `b`: `first[b]..=i`
    /// (earlier events of the same sequence). Empty for a padding query (`i < first[b]`).
    fn keys(&self, b: usize, i: usize) -> std::ops::Range<usize> {
        self.first[b]..(i + 1).max(self.first[b])
    }
}

impl CustomOp1 for CausalSoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(storage, layout, "causal softmax")?;
        let (batch, heads, len, len2) = layout.shape().dims4()?;
        if len != len2 || batch != self.first.len() {
            candle_core::bail!("causal softmax wants (batch {}, heads, L, L), got {:?}", self.first.len(), layout.shape());
        }
        let mut out = vec![0f32; x.len()];
        for (r, (row, o)) in x.chunks_exact(len).zip(out.chunks_exact_mut(len)).enumerate() {
            let keys = self.keys(r / (heads * len), r % len);
            if keys.is_empty() {
                continue;
            }
            let max = row[keys.clone()].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for j in keys.clone() {
                o[j] = (row[j] - max).exp();
                sum += o[j];
            }
            for v in &mut o[keys] {
                *v /= sum;
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx_j = y_j (g_j - Σ_k g_k y_k); masked entries have y = 0 and get no gradient.
        let (y, g) = (values(res)?, values(grad)?);
        let len = res.dim(3)?;
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), d) in y.chunks_exact(len).zip(g.chunks_exact(len)).zip(dx.chunks_exact_mut(len)) {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((dv, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                *dv = yv * (gv - dot);
            }
        }
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Attention probabilities from scores `x` (batch, heads, L, L) of left-padded sequences whose
/// first real column is `first[b]`: query i attends to keys `first[b]..=i` only (no future, no
/// padding); padding queries get all-zero rows (their outputs are never used as predictions).
pub fn causal_softmax(x: &Tensor, first: &[usize]) -> Result<Tensor> {
    x.contiguous()?.apply_op1(CausalSoftmaxOp { first: first.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut impl Rng, shape: (usize, usize)) -> Vec<f32> {
        (0..shape.0 * shape.1).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_ops_match_candle_values_and_gradients() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (rows, dim) = (7, 12);
        let x = Var::from_vec(random(&mut rng, (rows, dim)), (rows, dim), &dev).unwrap();
        let w = Var::from_vec(random(&mut rng, (1, dim)), dim, &dev).unwrap();
        let b = Var::from_vec(random(&mut rng, (1, dim)), dim, &dev).unwrap();
        let targets = Tensor::from_vec((0..rows as u32).map(|i| (i * 5) % dim as u32).collect(), rows, &dev).unwrap();
        let mix = Tensor::from_vec(random(&mut rng, (rows, dim)), (rows, dim), &dev).unwrap();

        // Reference built from candle's differentiable operations.
        let reference = |x: &Tensor| {
            let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
            let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let ln = centred
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(w.as_tensor())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let act = (ln.gelu_erf().unwrap() * &mix).unwrap();
            (ln, candle_nn::loss::cross_entropy(&act, &targets).unwrap())
        };
        let fused = |x: &Tensor| {
            let ln = layer_norm(x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            let act = (gelu_erf(&ln).unwrap() * &mix).unwrap();
            (ln, cross_entropy(&act, &targets).unwrap())
        };
        let (ln_ref, loss_ref) = reference(x.as_tensor());
        let (ln_fused, loss_fused) = fused(x.as_tensor());
        assert!(max_diff(&ln_ref, &ln_fused) < 1e-5);
        assert!(max_diff(&loss_ref, &loss_fused) < 1e-5);
        let g_ref = loss_ref.backward().unwrap();
        let g_fused = loss_fused.backward().unwrap();
        for var in [&x, &w, &b] {
            let (a, c) = (g_ref.get(var.as_tensor()).unwrap(), g_fused.get(var.as_tensor()).unwrap());
            assert!(max_diff(a, c) < 1e-5, "gradient differs by {}", max_diff(a, c));
        }
    }

    #[test]
    fn causal_softmax_matches_masked_candle_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (batch, heads, len) = (2, 2, 5);
        let first = [0usize, 2];
        let x = Var::from_vec(random(&mut rng, (batch * heads * len, len)), (batch, heads, len, len), &dev).unwrap();
        let weights = Tensor::from_vec(random(&mut rng, (batch * heads * len, len)), (batch, heads, len, len), &dev).unwrap();
        // Reference: -1e9 where a key is in the future or padding, candle's softmax, and the
        // padding query rows (all keys masked) zeroed afterwards.
        let mut mask = vec![0f32; batch * heads * len * len];
        let mut row_keep = vec![0f32; batch * heads * len * len];
        for (b, &first_b) in first.iter().enumerate().take(batch) {
            for h in 0..heads {
                for i in 0..len {
                    for j in 0..len {
                        let at = ((b * heads + h) * len + i) * len + j;
                        if j > i || j < first_b {
                            mask[at] = -1e9;
                        }
                        row_keep[at] = if i >= first[b] { 1.0 } else { 0.0 };
                    }
                }
            }
        }
        let shape = (batch, heads, len, len);
        let mask = Tensor::from_vec(mask, shape, &dev).unwrap();
        let row_keep = Tensor::from_vec(row_keep, shape, &dev).unwrap();
        let reference = (candle_nn::ops::softmax(&(x.as_tensor() + &mask).unwrap(), D::Minus1).unwrap() * &row_keep).unwrap();
        let fused = causal_softmax(x.as_tensor(), &first).unwrap();
        assert!(max_diff(&reference, &fused) < 1e-6);
        // A real query's probabilities sum to 1 over its allowed keys; the future gets nothing.
        let values = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |b: usize, i: usize, j: usize| values[((b * heads) * len + i) * len + j];
        assert!((at(1, 3, 2) + at(1, 3, 3) - 1.0).abs() < 1e-6 && at(1, 3, 4) == 0.0 && at(1, 3, 1) == 0.0);
        assert!((0..len).all(|j| at(1, 1, j) == 0.0), "padding query");
        let g_ref = (reference * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g_fused = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (g_ref.get(x.as_tensor()).unwrap(), g_fused.get(x.as_tensor()).unwrap());
        assert!(max_diff(a, c) < 1e-5, "gradient differs by {}", max_diff(a, c));
    }
}
