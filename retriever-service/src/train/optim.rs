//! AdamW with per-parameter weight-decay groups, global gradient-norm clipping, and a state that
//! can be saved and restored. The update itself is `llamarec_optim`'s, shared with the ranker;
//! what is the retriever's own is one `GradStore` per step, parameters a step may not touch, and
//! the weight-decay groups.

use crate::error::{Result, RetrieverError};
use crate::train::params::Param;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use llamarec_optim::{MomentConfig, Step};
use std::path::Path;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay for parameters that decay (see [`Param::decays`]).
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, weight_decay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

struct Moments {
    m: Tensor,
    v: Tensor,
}

/// The optimiser and its state.
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    moments: Vec<Moments>,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[Param], config: AdamWConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| Ok(Moments { m: p.var.zeros_like()?, v: p.var.zeros_like()? }))
            .collect::<Result<_>>()?;
        Ok(Self { config, step: 0, moments })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Scales the gradients so that their global L2 norm is at most `max_norm` (as PyTorch's
    /// `clip_grad_norm_`), applies one AdamW update, and returns the norm before clipping.
    pub fn step(&mut self, params: &[Param], grads: &GradStore, max_norm: Option<f64>) -> Result<f64> {
        let grads: Vec<Option<&Tensor>> = params.iter().map(|p| grads.get(p.var.as_tensor())).collect();
        let norm = llamarec_optim::global_norm(grads.iter().flatten().copied())?;
        self.step += 1;
        let c = &self.config;
        let step = Step::new(self.step, c.lr, MomentConfig { beta1: c.beta1, beta2: c.beta2, eps: c.eps }, norm, max_norm);
        for ((p, g), mom) in params.iter().zip(grads).zip(&mut self.moments) {
            // A parameter the loss did not touch (e.g. unused) keeps its value and moments.
            let Some(g) = g else { continue };
            let decay = if p.decays() { c.weight_decay } else { 0.0 };
            step.apply(&p.var, g, &mut mom.m, &mut mom.v, decay)?;
        }
        Ok(norm)
    }

    /// Writes the moments (`{name}.m`, `{name}.v`) to a safetensors file; the step count goes
    /// into the trainer state.
    pub fn save(&self, params: &[Param], path: &Path) -> Result<()> {
        llamarec_optim::save_moments(params.iter().zip(&self.moments).map(|(p, mom)| (p.name.as_str(), &mom.m, &mom.v)), path)?;
        Ok(())
    }

    /// Restores moments saved by [`AdamW::save`] after `steps` updates.
    pub fn load(params: &[Param], config: AdamWConfig, path: &Path, steps: u64) -> Result<Self> {
        let mut tensors = crate::checkpoint::load_tensors(path, &Device::Cpu)?;
        let mut moments = Vec::with_capacity(params.len());
        for p in params {
            let (m, v) = llamarec_optim::take_moments(&mut tensors, &p.name, p.var.dims()).map_err(|name| RetrieverError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("optimizer state lacks {name} of shape {:?}", p.var.dims()),
            })?;
            moments.push(Moments { m, v });
        }
        Ok(Self { config, step: steps, moments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn param(name: &str, values: &[f32]) -> Param {
        Param { name: name.into(), var: Var::new(values, &Device::Cpu).unwrap() }
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign_and_decays() {
        // With bias correction the first Adam update is lr · g / (|g| + eps) = ±lr.
        let params = vec![param("w", &[1.0, -2.0]), param("b.bias", &[1.0, -2.0])];
        let loss = (params[0].var.as_tensor().sum_all().unwrap() * 3.0).unwrap()
            + (params[1].var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let grads = loss.unwrap().backward().unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let mut opt = AdamW::new(&params, cfg).unwrap();
        let norm = opt.step(&params, &grads, None).unwrap();
        // Gradients: w -> [3, 3], b.bias -> [1, -2].
        assert!((norm - (9.0f64 + 9.0 + 1.0 + 4.0).sqrt()).abs() < 1e-5);
        let w = params[0].var.to_vec1::<f32>().unwrap();
        let b = params[1].var.to_vec1::<f32>().unwrap();
        // w decays (×(1 − 0.1·0.5)) then steps −0.1; biases do not decay.
        assert!((w[0] - (1.0 * 0.95 - 0.1)).abs() < 1e-5 && (w[1] - (-2.0 * 0.95 - 0.1)).abs() < 1e-5, "{w:?}");
        assert!((b[0] - 0.9).abs() < 1e-5 && (b[1] + 1.9).abs() < 1e-5, "{b:?}");
    }

    #[test]
    fn clipping_scales_the_gradient_used_for_the_moments() {
        let params = vec![param("w", &[0.0])];
        let grads = (params[0].var.as_tensor().sum_all().unwrap() * 100.0).unwrap().backward().unwrap();
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let norm = opt.step(&params, &grads, Some(5.0)).unwrap();
        assert!((norm - 100.0).abs() < 1e-4);
        let m = opt.moments[0].m.to_vec1::<f32>().unwrap()[0];
        assert!((m - 0.1 * 5.0).abs() < 1e-4, "first moment from the clipped gradient: {m}");
    }

    #[test]
    fn state_round_trips_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let params = vec![param("w", &[1.0, 2.0])];
        let grads = params[0].var.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        opt.step(&params, &grads, None).unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&params, &path).unwrap();
        let restored = AdamW::load(&params, AdamWConfig::default(), &path, opt.steps()).unwrap();
        assert_eq!(restored.steps(), 1);
        assert_eq!(restored.moments[0].v.to_vec1::<f32>().unwrap(), opt.moments[0].v.to_vec1::<f32>().unwrap());
    }
}
