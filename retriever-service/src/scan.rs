//! The linear recurrence h_t = λ ⊙ h_{t-1} + b_t over a whole sequence in log-depth, for training.
//!
//! λ is diagonal, complex and the same at every step, so the Hillis–Steele inclusive scan needs
//! only the powers λ^(2^j): after level j every position holds the sum of its last 2^(j+1)
//! inputs, each weighted by the matching power of λ, and
//! `S_{j+1}(t) = S_j(t) + λ^(2^j) ⊙ S_j(t - 2^j)`.
//! That is ⌈log2 L⌉ levels of a shifted complex multiply-add over the whole batch, a handful of
//! large tensor operations instead of L small ones, and the gradient flows through ordinary
//! candle operations. Serving runs the same recurrence one step at a time (`encoder.rs`).

use candle_core::{Result, Tensor};

/// λ^k as (real, imaginary) parts, from ν = exp(nu_log) and θ = exp(theta_log):
/// λ^k = exp(-k ν) (cos kθ + i sin kθ), computed directly rather than by repeated squaring so the
/// error does not compound over levels.
fn lambda_power(nu: &Tensor, theta: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let modulus = (nu * -(k as f64))?.exp()?;
    let angle = (theta * k as f64)?;
    Ok(((&modulus * angle.cos()?)?, (&modulus * angle.sin()?)?))
}

/// Runs h_t = λ ⊙ h_{t-1} + b_t along dimension 1 of `b_re`/`b_im` (batch, length, state),
/// starting from h_{-1} = 0, with λ = exp(-ν + iθ) given per state as `nu`, `theta` (state).
/// Returns every h_t as (real, imaginary).
pub fn parallel_scan(b_re: &Tensor, b_im: &Tensor, nu: &Tensor, theta: &Tensor) -> Result<(Tensor, Tensor)> {
    let len = b_re.dim(1)?;
    let (mut h_re, mut h_im) = (b_re.clone(), b_im.clone());
    let mut k = 1;
    while k < len {
        let (p_re, p_im) = lambda_power(nu, theta, k)?;
        let prev_re = h_re.narrow(1, 0, len - k)?;
        let prev_im = h_im.narrow(1, 0, len - k)?;
        let add_re = (prev_re.broadcast_mul(&p_re)? - prev_im.broadcast_mul(&p_im)?)?;
        let add_im = (prev_re.broadcast_mul(&p_im)? + prev_im.broadcast_mul(&p_re)?)?;
        h_re = (h_re + add_re.pad_with_zeros(1, k, 0)?)?;
        h_im = (h_im + add_im.pad_with_zeros(1, k, 0)?)?;
        k *= 2;
    }
    Ok((h_re, h_im))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// The plain recurrence, one step at a time, in f64.
    fn sequential(b_re: &[f32], b_im: &[f32], lam_re: &[f64], lam_im: &[f64], len: usize) -> (Vec<f64>, Vec<f64>) {
        let n = lam_re.len();
        let (mut h_re, mut h_im) = (vec![0.0; n], vec![0.0; n]);
        let (mut out_re, mut out_im) = (Vec::new(), Vec::new());
        for t in 0..len {
            for s in 0..n {
                let (r, i) = (h_re[s], h_im[s]);
                h_re[s] = lam_re[s] * r - lam_im[s] * i + b_re[t * n + s] as f64;
                h_im[s] = lam_re[s] * i + lam_im[s] * r + b_im[t * n + s] as f64;
            }
            out_re.extend_from_slice(&h_re);
            out_im.extend_from_slice(&h_im);
        }
        (out_re, out_im)
    }

    #[test]
    fn parallel_scan_matches_the_step_recurrence_at_every_position() {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let [nu_log, theta_log, _] = crate::init::ring(&mut rng, 16, 0.8, 0.99);
        let nu: Vec<f32> = nu_log.iter().map(|x| x.exp()).collect();
        let theta: Vec<f32> = theta_log.iter().map(|x| x.exp()).collect();
        let lam_re: Vec<f64> = (0..16).map(|s| (-(nu[s] as f64)).exp() * (theta[s] as f64).cos()).collect();
        let lam_im: Vec<f64> = (0..16).map(|s| (-(nu[s] as f64)).exp() * (theta[s] as f64).sin()).collect();
        // Lengths around powers of two exercise the partial last level.
        for len in [1, 2, 3, 7, 8, 9, 100, 200, 256] {
            let b_re: Vec<f32> = (0..len * 16).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b_im: Vec<f32> = (0..len * 16).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let (want_re, want_im) = sequential(&b_re, &b_im, &lam_re, &lam_im, len);
            let (h_re, h_im) = parallel_scan(
                &Tensor::from_vec(b_re, (1, len, 16), &dev).unwrap(),
                &Tensor::from_vec(b_im, (1, len, 16), &dev).unwrap(),
                &Tensor::new(nu.as_slice(), &dev).unwrap(),
                &Tensor::new(theta.as_slice(), &dev).unwrap(),
            )
            .unwrap();
            let got_re = h_re.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got_im = h_im.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = got_re
                .iter()
                .zip(&want_re)
                .chain(got_im.iter().zip(&want_im))
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(diff <= 1e-4, "length {len}: max abs diff {diff}");
        }
    }

    #[test]
    fn gradient_reaches_lambda_through_the_scan() {
        let dev = Device::Cpu;
        let nu = Var::new(&[0.05f32, 0.1], &dev).unwrap();
        let theta = Var::new(&[0.3f32, 1.0], &dev).unwrap();
        let b = Tensor::ones((1, 5, 2), candle_core::DType::F32, &dev).unwrap();
        let (h_re, _) = parallel_scan(&b, &b, nu.as_tensor(), theta.as_tensor()).unwrap();
        let grads = h_re.sum_all().unwrap().backward().unwrap();
        let g = grads.get(nu.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|x| x.abs() > 1e-3), "{g:?}");
        assert!(grads.get(theta.as_tensor()).is_some());
    }
}
