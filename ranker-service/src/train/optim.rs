//! AdamW over the LoRA matrices with moments that can be saved and restored (resume).
//!
//! candle-nn's `AdamW` keeps its moments private (no resume), and the retriever's optimiser
//! (`retriever_service::optim`) is tied to that crate's parameter type and to one `GradStore`
//! per step, while the ranker accumulates gradients over several examples; the update rule is
//! the same (decoupled weight decay, bias-corrected moments, global-norm clipping).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (the learning rate is passed per step: warm-up schedules it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
}

/// One named trainable matrix.
#[derive(Debug, Clone)]
pub struct NamedVar {
    /// PEFT tensor name.
    pub name: String,
    /// The variable.
    pub var: Var,
}

/// The optimiser state.
pub struct AdamW {
    config: AdamWConfig,
    steps: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[NamedVar], config: AdamWConfig) -> Result<Self> {
        let zeros = || {
            params
                .iter()
                .map(|p| Ok(p.var.as_tensor().zeros_like()?))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            config,
            steps: 0,
            m: zeros()?,
            v: zeros()?,
        })
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clips `grads` (one per param) to global norm `max_norm`, applies one update with
    /// learning rate `lr`, and returns the norm before clipping.
    pub fn step(
        &mut self,
        params: &[NamedVar],
        grads: &[Tensor],
        lr: f64,
        max_norm: Option<f64>,
    ) -> Result<f64> {
        let mut sq = 0.0f64;
        for g in grads {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        let scale = match max_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&self.m[i] / bias1)? / ((&self.v[i] / bias2)?.sqrt()? + c.eps)?)?;
            let theta = (p.var.as_tensor().detach() * (1.0 - lr * c.weight_decay))?;
            p.var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    /// Writes the moments (`{name}.m`, `{name}.v`) as safetensors.
    pub fn save(&self, params: &[NamedVar], path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            map.insert(format!("{}.m", p.name), self.m[i].clone());
            map.insert(format!("{}.v", p.name), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Restores moments written by [`AdamW::save`] after `steps` updates.
    pub fn load(params: &[NamedVar], config: AdamWConfig, path: &Path, steps: u64) -> Result<Self> {
        let device = params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut tensors = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("reading {}", path.display()))?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for p in params {
            for (suffix, out) in [("m", &mut m), ("v", &mut v)] {
                let name = format!("{}.{suffix}", p.name);
                match tensors.remove(&name) {
                    Some(t) if t.dims() == p.var.dims() => out.push(t),
                    _ => bail!("{}: no {name} of shape {:?}", path.display(), p.var.dims()),
                }
            }
        }
        Ok(Self {
            config,
            steps,
            m,
            v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_by_lr_and_state_round_trips() {
        let params = vec![NamedVar {
            name: "w".into(),
            var: Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap(),
        }];
        let grads = vec![Tensor::new(&[3.0f32, -0.5], &Device::Cpu).unwrap()];
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut opt = AdamW::new(&params, cfg).unwrap();
        let norm = opt.step(&params, &grads, 0.1, None).unwrap();
        assert!((norm - (9.0f64 + 0.25).sqrt()).abs() < 1e-5);
        let w = params[0].var.as_tensor().to_vec1::<f32>().unwrap();
        // Bias-corrected first step: -lr * sign(g), after decay by (1 - lr * wd).
        assert!(
            (w[0] - (0.95 - 0.1)).abs() < 1e-5 && (w[1] - (-1.9 + 0.1)).abs() < 1e-5,
            "{w:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&params, &path).unwrap();
        let back = AdamW::load(&params, cfg, &path, opt.steps()).unwrap();
        assert_eq!(back.steps(), 1);
        assert_eq!(
            back.v[0].to_vec1::<f32>().unwrap(),
            opt.v[0].to_vec1::<f32>().unwrap()
        );
    }
}
