//! Parameter initialisation as in the public LRURec code: truncated normal for weights and biases,
//! ring initialisation for the recurrence.

use candle_core::cpu::erf::{erf_f64, erf_inv};
use rand::Rng;

/// `n` samples of a normal with mean 0 and `std`, truncated to [-2 std, 2 std].
///
/// Inverse-CDF sampling (uniform in the truncated CDF range, then erf⁻¹), the same recipe the
/// reference code applies in place, so the distribution matches exactly rather than by rejection.
pub fn truncated_normal(rng: &mut impl Rng, n: usize, std: f64) -> Vec<f32> {
    let cdf = |z: f64| (1.0 + erf_f64(z / std::f64::consts::SQRT_2)) / 2.0;
    let (lo, hi) = (2.0 * cdf(-2.0) - 1.0, 2.0 * cdf(2.0) - 1.0);
    (0..n)
        .map(|_| {
            let u: f64 = rng.gen_range(lo..hi);
            (erf_inv(u) * std * std::f64::consts::SQRT_2) as f32
        })
        .collect()
}

/// Initial `(nu_log, theta_log, gamma_log)` of a diagonal recurrence with `n` complex states.
///
/// |lambda| = r is drawn so that lambda is uniform over the ring area r_min <= r <= r_max, i.e.
/// r² uniform in [r_min², r_max²] (the LRU paper's Lemma 3.2), phase uniform in (0, 2π).
/// lambda = exp(-exp(nu_log) + i exp(theta_log)); gamma = sqrt(1 - |lambda|²) keeps the state's
/// variance independent of r at initialisation.
pub fn ring(rng: &mut impl Rng, n: usize, r_min: f64, r_max: f64) -> [Vec<f32>; 3] {
    let mut nu_log = Vec::with_capacity(n);
    let mut theta_log = Vec::with_capacity(n);
    let mut gamma_log = Vec::with_capacity(n);
    for _ in 0..n {
        let u1: f64 = rng.gen();
        // Open at 0: theta_log = ln(theta) must stay finite.
        let u2: f64 = 1.0 - rng.gen::<f64>();
        let r_squared = u1 * (r_max * r_max - r_min * r_min) + r_min * r_min;
        let nu = -0.5 * r_squared.ln();
        nu_log.push(nu.ln() as f32);
        theta_log.push((u2 * std::f64::consts::TAU).ln() as f32);
        gamma_log.push((0.5 * (1.0 - r_squared).ln()) as f32);
    }
    [nu_log, theta_log, gamma_log]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn truncated_normal_stays_within_two_deviations_with_the_right_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let xs = truncated_normal(&mut rng, 100_000, 0.02);
        assert!(xs.iter().all(|x| x.abs() <= 0.04 + 1e-7));
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        // A normal truncated at ±2σ has standard deviation 0.8796σ.
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() - 0.8796 * 0.02).abs() < 3e-4, "{}", var.sqrt());
    }

    #[test]
    fn ring_init_lies_in_the_ring_and_normalises_gamma() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let [nu_log, theta_log, gamma_log] = ring(&mut rng, 10_000, 0.8, 0.99);
        let mut r2_sum = 0.0;
        for i in 0..nu_log.len() {
            let r = (-(nu_log[i] as f64).exp()).exp();
            let theta = (theta_log[i] as f64).exp();
            let gamma = (gamma_log[i] as f64).exp();
            assert!((0.8 - 1e-6..=0.99 + 1e-6).contains(&r), "{r}");
            assert!(theta > 0.0 && theta <= std::f64::consts::TAU + 1e-6);
            assert!((gamma - (1.0 - r * r).sqrt()).abs() < 1e-5);
            r2_sum += r * r;
        }
        // r² is uniform, so its mean is the midpoint of [0.64, 0.9801].
        assert!((r2_sum / 10_000.0 - (0.64 + 0.9801) / 2.0).abs() < 5e-3);
    }
}
