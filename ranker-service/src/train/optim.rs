//! AdamW over the LoRA matrices with moments that can be saved and restored (resume).
//!
//! The update itself is `llamarec_optim`'s, shared with the retriever; what is the ranker's own
//! is the learning rate passed per step (warm-up), gradients accumulated over several examples,
//! and the LoRA matrices by PEFT name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use llamarec_optim::{MomentConfig, Step};
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
        let norm = llamarec_optim::global_norm(grads)?;
        self.steps += 1;
        let c = self.config;
        let moments = MomentConfig {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
        };
        let step = Step::new(self.steps, lr, moments, norm, max_norm);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            step.apply(&p.var, g, &mut self.m[i], &mut self.v[i], c.weight_decay)?;
        }
        Ok(norm)
    }

    /// Writes the moments (`{name}.m`, `{name}.v`) as safetensors.
    pub fn save(&self, params: &[NamedVar], path: &Path) -> Result<()> {
        let moments = params
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .map(|(p, (m, v))| (p.name.as_str(), m, v));
        llamarec_optim::save_moments(moments, path)?;
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
            match llamarec_optim::take_moments(&mut tensors, &p.name, p.var.dims()) {
                Ok((pm, pv)) => {
                    m.push(pm);
                    v.push(pv);
                }
                Err(name) => bail!("{}: no {name} of shape {:?}", path.display(), p.var.dims()),
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

    /// Each committed run's `checkpoint/optimizer.safetensors` loads for the adapter beside it
    /// and saves back the same moments (the file format resumption reads).
    #[test]
    fn committed_checkpoints_load_and_save_the_same_moments() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("training");
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut checked = 0;
        for run in std::fs::read_dir(&root).unwrap() {
            let ckpt = run.unwrap().path().join("checkpoint");
            let path = ckpt.join("optimizer.safetensors");
            if !path.is_file() {
                continue;
            }
            let adapter = candle_core::safetensors::load(
                ckpt.join("adapter_model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            let params: Vec<NamedVar> = adapter
                .into_iter()
                .map(|(name, t)| NamedVar {
                    name,
                    var: Var::from_tensor(&t).unwrap(),
                })
                .collect();
            let opt = AdamW::load(&params, cfg, &path, 7).unwrap();
            let dir = tempfile::tempdir().unwrap();
            opt.save(&params, &dir.path().join("o.safetensors"))
                .unwrap();
            let before = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let after =
                candle_core::safetensors::load(dir.path().join("o.safetensors"), &Device::Cpu)
                    .unwrap();
            assert_eq!(before.len(), after.len(), "{}", path.display());
            for (name, t) in &before {
                let back = after[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    back,
                    "{name}"
                );
            }
            checked += 1;
        }
        assert!(
            checked > 0,
            "no committed checkpoint under {}",
            root.display()
        );
    }
}
