//! AdamW's update, shared by the ranker's LoRA training and the retriever's training: global-norm
//! clipping, bias-corrected moments, decoupled weight decay, and the safetensors layout of the
//! moments (`{name}.m`, `{name}.v`), so that both crates' checkpoints keep their files.
//!
//! Each crate keeps its own `AdamW` around this core because what differs is real: the ranker
//! passes the learning rate per step (warm-up) with gradients it accumulated over several
//! examples, for named LoRA matrices; the retriever takes one `GradStore` per step, skips the
//! parameters a step did not touch, and exempts biases and norms from weight decay. candle-nn's
//! `AdamW` keeps its moments private, which rules out resuming a run.
//!
//! A crate of its own rather than a `candle` feature of `llamarec-common`: cargo unifies a
//! crate's features over everything in one build, so with the feature on for the model
//! services, `common` and everything above it that is not a model service (the gateway) would
//! be compiled twice, without candle for `cargo build -p gateway` and with it wherever a model
//! service is in the same build (the CLI, the test suite). Only the model services depend on
//! this crate; the gateway never compiles candle.

use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// The moment decays and the denominator's epsilon, the same for every tensor and step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MomentConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
}

/// L2 norm of all `grads` together, what global-norm clipping compares with its limit.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

/// What one update applies to every tensor: the learning rate, both bias corrections and the
/// clipping scale.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    lr: f64,
    config: MomentConfig,
    bias1: f64,
    bias2: f64,
    scale: f64,
}

impl Step {
    /// Update number `t` (from 1) with learning rate `lr`, for gradients of global norm `norm`:
    /// they are scaled to `max_norm` when above it (as PyTorch's `clip_grad_norm_`).
    pub fn new(t: u64, lr: f64, config: MomentConfig, norm: f64, max_norm: Option<f64>) -> Self {
        let scale = match max_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let t = t as i32;
        let (bias1, bias2) = (1.0 - config.beta1.powi(t), 1.0 - config.beta2.powi(t));
        Self {
            lr,
            config,
            bias1,
            bias2,
            scale,
        }
    }

    /// Updates `var` from its gradient `grad`, advancing its moments `m` and `v`; the weights
    /// first shrink by `lr · weight_decay` (decoupled decay; 0 for tensors exempt from it).
    pub fn apply(
        &self,
        var: &Var,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        weight_decay: f64,
    ) -> Result<()> {
        let c = self.config;
        let g = (grad * self.scale)?;
        *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let update = ((&*m / self.bias1)? / ((&*v / self.bias2)?.sqrt()? + c.eps)?)?;
        let theta = (var.as_tensor().detach() * (1.0 - self.lr * weight_decay))?;
        var.set(&(theta - (update * self.lr)?)?)
    }
}

/// Writes the moments of each named tensor (`{name}.m`, `{name}.v`) to a safetensors file.
pub fn save_moments<'a>(
    moments: impl IntoIterator<Item = (&'a str, &'a Tensor, &'a Tensor)>,
    path: &Path,
) -> Result<()> {
    let mut map = HashMap::new();
    for (name, m, v) in moments {
        map.insert(format!("{name}.m"), m.clone());
        map.insert(format!("{name}.v"), v.clone());
    }
    candle_core::safetensors::save(&map, path)
}

/// Takes the moments of tensor `name` out of a file's `tensors`; the error is the name of the
/// first one missing or not of shape `dims`.
pub fn take_moments(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
) -> std::result::Result<(Tensor, Tensor), String> {
    let mut take = |suffix: &str| {
        let key = format!("{name}.{suffix}");
        tensors.remove(&key).filter(|t| t.dims() == dims).ok_or(key)
    };
    let m = take("m")?;
    Ok((m, take("v")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const CONFIG: MomentConfig = MomentConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };

    #[test]
    fn the_first_update_is_lr_against_the_gradient_sign_after_decay() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let grad = Tensor::new(&[3.0f32, -0.5], &Device::Cpu).unwrap();
        let (mut m, mut v) = (grad.zeros_like().unwrap(), grad.zeros_like().unwrap());
        let norm = global_norm([&grad]).unwrap();
        assert!((norm - 9.25f64.sqrt()).abs() < 1e-6);
        Step::new(1, 0.1, CONFIG, norm, None)
            .apply(&var, &grad, &mut m, &mut v, 0.5)
            .unwrap();
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (w[0] - (0.95 - 0.1)).abs() < 1e-5 && (w[1] - (-1.9 + 0.1)).abs() < 1e-5,
            "{w:?}"
        );
    }

    #[test]
    fn clipping_scales_the_gradient_the_moments_see() {
        let var = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let grad = Tensor::new(&[100.0f32], &Device::Cpu).unwrap();
        let (mut m, mut v) = (grad.zeros_like().unwrap(), grad.zeros_like().unwrap());
        Step::new(1, 1e-3, CONFIG, 100.0, Some(5.0))
            .apply(&var, &grad, &mut m, &mut v, 0.0)
            .unwrap();
        let m = m.to_vec1::<f32>().unwrap()[0];
        assert!((m - 0.1 * 5.0).abs() < 1e-4, "{m}");
    }

    #[test]
    fn moments_round_trip_and_a_missing_or_misshapen_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let (m, v) = (
            Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap(),
            Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap(),
        );
        save_moments([("w", &m, &v)], &path).unwrap();
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            take_moments(&mut tensors.clone(), "w", &[3]).unwrap_err(),
            "w.m"
        );
        assert_eq!(
            take_moments(&mut tensors.clone(), "x", &[2]).unwrap_err(),
            "x.m"
        );
        let (m2, v2) = take_moments(&mut tensors, "w", &[2]).unwrap();
        assert_eq!(m2.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(v2.to_vec1::<f32>().unwrap(), [3.0, 4.0]);
    }
}
