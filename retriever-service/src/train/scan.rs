//! The linear recurrence h_t = λ ⊙ h_{t-1} + b_t over whole sequences in log depth, for training.
//!
//! The recurrence is a scan under the associative operator
//! (λ^m, x) ∘ (λ^n, y) = (λ^(m+n), λ^n x + y), and λ is the same at every step, so a segment of
//! length n only needs λ^n. The scan is the work-efficient Brent–Kung/Blelloch scheme:
//! an up-sweep that combines pairs of segments of length 1, 2, 4, ... and a down-sweep that
//! completes the prefixes in between, 2⌈log2 L⌉ levels whose combines within a level are
//! independent. It runs as one candle custom operation over the whole batch, with its gradient,
//! because building each level from generic tensor operations (shifts, complex products, pads)
//! costs ~20 passes over the batch's state per level and dominated a training step on CPU.
//!
//! The gradient of a linear recurrence is the same recurrence run backwards with conj(λ):
//! with a_t = ∂L/∂h_t accumulated over the future, a_t = g_t + conj(λ) a_{t+1}, so ∂L/∂b_t = a_t
//! and ∂L/∂λ = Σ_t a_t conj(h_{t-1}); the backward pass is the same scan, reversed.
//!
//! Complex values are stored as real/imaginary halves of the last dimension:
//! a row of width 2H is [Re (H values) | Im (H values)].

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// λ^(2^d) for d = 0..levels, per state, as (re, im) in f64 (squaring in f64 keeps the error
/// of λ^128 at the f32 rounding level).
fn doubling_powers(lam_re: &[f32], lam_im: &[f32], levels: usize) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut powers = Vec::with_capacity(levels);
    let mut re: Vec<f64> = lam_re.iter().map(|&v| v as f64).collect();
    let mut im: Vec<f64> = lam_im.iter().map(|&v| v as f64).collect();
    for _ in 0..levels {
        powers.push((re.clone(), im.clone()));
        for s in 0..re.len() {
            let (r, i) = (re[s], im[s]);
            re[s] = r * r - i * i;
            im[s] = 2.0 * r * i;
        }
    }
    powers
}

/// row[dst] += λ^s ⊙ row[src] for complex rows of width 2H.
#[inline]
fn combine(data: &mut [f32], dst: usize, src: usize, width: usize, p_re: &[f32], p_im: &[f32]) {
    let h = width / 2;
    let (src_row, dst_row) = if src < dst {
        let (a, b) = data.split_at_mut(dst * width);
        (&a[src * width..(src + 1) * width], &mut b[..width])
    } else {
        let (a, b) = data.split_at_mut(src * width);
        (&b[..width], &mut a[dst * width..(dst + 1) * width])
    };
    let (x_re, x_im) = src_row.split_at(h);
    let (y_re, y_im) = dst_row.split_at_mut(h);
    for s in 0..h {
        let (xr, xi) = (x_re[s], x_im[s]);
        y_re[s] += p_re[s] * xr - p_im[s] * xi;
        y_im[s] += p_re[s] * xi + p_im[s] * xr;
    }
}

/// In-place inclusive scan of every sequence in `data` ((batch × len) rows of width 2H),
/// forwards (row t absorbs rows before it) or backwards (row t absorbs rows after it).
fn scan_in_place(data: &mut [f32], batch: usize, len: usize, lam_re: &[f32], lam_im: &[f32], reverse: bool) {
    let width = 2 * lam_re.len();
    let levels = usize::BITS as usize - len.leading_zeros() as usize;
    let powers: Vec<(Vec<f32>, Vec<f32>)> = doubling_powers(lam_re, lam_im, levels)
        .into_iter()
        .map(|(re, im)| (re.into_iter().map(|v| v as f32).collect(), im.into_iter().map(|v| v as f32).collect()))
        .collect();
    // Position p of the scan order is row `at(p)` of a sequence.
    let at = |p: usize| if reverse { len - 1 - p } else { p };
    for seq in data.chunks_exact_mut(len * width).take(batch) {
        // Up-sweep: position i (with i + 1 a multiple of 2s) absorbs the segment ending s earlier.
        let mut level = 0;
        while (2 << level) <= len {
            let s = 1 << level;
            let (p_re, p_im) = &powers[level];
            let mut i = 2 * s - 1;
            while i < len {
                combine(seq, at(i), at(i - s), width, p_re, p_im);
                i += 2 * s;
            }
            level += 1;
        }
        // Down-sweep: position i = 3s - 1 + 2sk holds a segment of length s; the position s
        // earlier already holds its full prefix.
        while level > 0 {
            level -= 1;
            let s = 1 << level;
            let (p_re, p_im) = &powers[level];
            let mut i = 3 * s - 1;
            while i < len {
                combine(seq, at(i), at(i - s), width, p_re, p_im);
                i += 2 * s;
            }
        }
    }
}

fn dims(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (batch, len, width) = layout.shape().dims3()?;
    if width % 2 != 0 {
        candle_core::bail!("scan input width {width} is not an even [re | im] split");
    }
    Ok((batch, len, width))
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("scan expects contiguous inputs"),
    }
}

/// The scan as a candle operation: `b` (batch, length, 2H) and `lambda` (2H) → h.
struct LinearScan;

impl CustomOp2 for LinearScan {
    fn name(&self) -> &'static str {
        "lru-linear-scan"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, len, width) = dims(l1)?;
        let lambda = contiguous_f32(s2, l2)?;
        if lambda.len() != width {
            candle_core::bail!("scan lambda has {} values for inputs of width {width}", lambda.len());
        }
        let mut h = contiguous_f32(s1, l1)?.to_vec();
        let (lam_re, lam_im) = lambda.split_at(width / 2);
        scan_in_place(&mut h, batch, len, lam_re, lam_im, false);
        Ok((CpuStorage::F32(h), l1.shape().clone()))
    }

    fn bwd(&self, _b: &Tensor, lambda: &Tensor, h: &Tensor, grad_h: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (batch, len, width) = h.dims3()?;
        let half = width / 2;
        let lambda = lambda.to_vec1::<f32>()?;
        let (lam_re, lam_im) = lambda.split_at(half);
        let conj_im: Vec<f32> = lam_im.iter().map(|v| -v).collect();
        let mut adjoint = grad_h.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        scan_in_place(&mut adjoint, batch, len, lam_re, &conj_im, true);
        let states = h.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // ∂L/∂λ = Σ_t a_t · conj(h_{t-1}), accumulated in f64 over batch and time.
        let (mut g_re, mut g_im) = (vec![0f64; half], vec![0f64; half]);
        for seq in 0..batch {
            for t in 1..len {
                let a = &adjoint[(seq * len + t) * width..(seq * len + t + 1) * width];
                let prev = &states[(seq * len + t - 1) * width..(seq * len + t) * width];
                for s in 0..half {
                    let (ar, ai, hr, hi) = (a[s] as f64, a[half + s] as f64, prev[s] as f64, prev[half + s] as f64);
                    g_re[s] += ar * hr + ai * hi;
                    g_im[s] += ai * hr - ar * hi;
                }
            }
        }
        let grad_lambda: Vec<f32> = g_re.iter().chain(&g_im).map(|&v| v as f32).collect();
        Ok((
            Some(Tensor::from_vec(adjoint, h.shape(), h.device())?),
            Some(Tensor::from_vec(grad_lambda, width, h.device())?),
        ))
    }
}

/// Runs h_t = λ ⊙ h_{t-1} + b_t along dimension 1 of `b` (batch, length, 2H), from h_{-1} = 0,
/// with `lambda` (2H) = [Re λ | Im λ]; rows of `b` and of the result are [Re | Im].
/// Differentiable with respect to both `b` and `lambda`.
pub fn parallel_scan(b: &Tensor, lambda: &Tensor) -> Result<Tensor> {
    b.contiguous()?.apply_op2(&lambda.contiguous()?, LinearScan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// The plain recurrence, one step at a time, in f64, rows [re | im].
    fn sequential(b: &[f32], lam_re: &[f64], lam_im: &[f64], len: usize) -> Vec<f64> {
        let n = lam_re.len();
        let (mut h_re, mut h_im) = (vec![0.0; n], vec![0.0; n]);
        let mut out = Vec::new();
        for t in 0..len {
            let row = &b[t * 2 * n..(t + 1) * 2 * n];
            for s in 0..n {
                let (r, i) = (h_re[s], h_im[s]);
                h_re[s] = lam_re[s] * r - lam_im[s] * i + row[s] as f64;
                h_im[s] = lam_re[s] * i + lam_im[s] * r + row[n + s] as f64;
            }
            out.extend_from_slice(&h_re);
            out.extend_from_slice(&h_im);
        }
        out
    }

    fn ring_lambda(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        let [nu_log, theta_log, _] = crate::train::init::ring(rng, n, 0.8, 0.99);
        let modulus: Vec<f64> = nu_log.iter().map(|&v| (-(v as f64).exp()).exp()).collect();
        let theta: Vec<f64> = theta_log.iter().map(|&v| (v as f64).exp()).collect();
        let re = modulus.iter().zip(&theta).map(|(m, t)| (m * t.cos()) as f32);
        let im = modulus.iter().zip(&theta).map(|(m, t)| (m * t.sin()) as f32);
        re.chain(im).collect()
    }

    #[test]
    fn parallel_scan_matches_the_step_recurrence_at_every_position() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 16;
        let lambda = ring_lambda(&mut rng, n);
        let lam_re: Vec<f64> = lambda[..n].iter().map(|&v| v as f64).collect();
        let lam_im: Vec<f64> = lambda[n..].iter().map(|&v| v as f64).collect();
        // Lengths around powers of two exercise partial up- and down-sweeps.
        for len in [1, 2, 3, 5, 7, 8, 9, 100, 200, 255, 256, 257] {
            let batch = 3;
            let b: Vec<f32> = (0..batch * len * 2 * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let h = parallel_scan(
                &Tensor::from_vec(b.clone(), (batch, len, 2 * n), &dev).unwrap(),
                &Tensor::new(lambda.as_slice(), &dev).unwrap(),
            )
            .unwrap();
            let got = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for seq in 0..batch {
                let span = seq * len * 2 * n..(seq + 1) * len * 2 * n;
                let want = sequential(&b[span.clone()], &lam_re, &lam_im, len);
                let diff = got[span].iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                assert!(diff <= 1e-4, "length {len}, sequence {seq}: max abs diff {diff}");
            }
        }
    }

    /// The recurrence unrolled into generic candle operations: autograd gives the reference
    /// gradient.
    fn unrolled(b: &Tensor, lambda: &Tensor, n: usize) -> Tensor {
        let (lr, li) = (lambda.narrow(0, 0, n).unwrap(), lambda.narrow(0, n, n).unwrap());
        let len = b.dim(1).unwrap();
        let mut h_re = b.narrow(1, 0, 1).unwrap().narrow(2, 0, n).unwrap();
        let mut h_im = b.narrow(1, 0, 1).unwrap().narrow(2, n, n).unwrap();
        let mut rows = vec![Tensor::cat(&[&h_re, &h_im], 2).unwrap()];
        for t in 1..len {
            let row = b.narrow(1, t, 1).unwrap();
            let re = ((h_re.broadcast_mul(&lr).unwrap() - h_im.broadcast_mul(&li).unwrap()).unwrap()
                + row.narrow(2, 0, n).unwrap())
            .unwrap();
            let im = ((h_im.broadcast_mul(&lr).unwrap() + h_re.broadcast_mul(&li).unwrap()).unwrap()
                + row.narrow(2, n, n).unwrap())
            .unwrap();
            h_re = re;
            h_im = im;
            rows.push(Tensor::cat(&[&h_re, &h_im], 2).unwrap());
        }
        Tensor::cat(&rows, 1).unwrap()
    }

    #[test]
    fn gradients_match_autograd_through_the_unrolled_recurrence() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (batch, len, n) = (2, 13, 4);
        let b = Var::from_vec((0..batch * len * 2 * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(), (batch, len, 2 * n), &dev)
            .unwrap();
        let lambda = Var::from_vec(ring_lambda(&mut rng, n), 2 * n, &dev).unwrap();
        let weights = Tensor::from_vec((0..batch * len * 2 * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(), (batch, len, 2 * n), &dev)
            .unwrap();
        let grads_of = |h: Tensor| {
            let g = (h * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = g.get(b.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gl = g.get(lambda.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            (gb, gl)
        };
        let (want_b, want_l) = grads_of(unrolled(b.as_tensor(), lambda.as_tensor(), n));
        let (got_b, got_l) = grads_of(parallel_scan(b.as_tensor(), lambda.as_tensor()).unwrap());
        let max_diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_diff(&got_b, &want_b) < 1e-4, "{}", max_diff(&got_b, &want_b));
        assert!(max_diff(&got_l, &want_l) < 1e-3, "{got_l:?} vs {want_l:?}");
    }
}
