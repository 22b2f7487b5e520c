//! LoRA adapters in Hugging Face PEFT's file layout: a directory with `adapter_config.json`
//! (rank, alpha, target modules, ...) and `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`lora_B` likewise), so
//! adapters trained with PEFT can be served and ours can be loaded by PEFT.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{RankerError, Result};
use crate::lora::{LoraAdapter, Projection};

/// The adapter configuration file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of PEFT's `LoraConfig` that decide what the adapter computes. Other fields of a
/// PEFT file are ignored on load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftLoraConfig {
    /// Always "LORA".
    #[serde(default = "lora")]
    pub peft_type: String,
    /// PEFT's task type; "CAUSAL_LM" for a ranker.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Rank of the update.
    pub r: usize,
    /// Scaling numerator: the update is `(lora_alpha / r) B A` (or `/ sqrt(r)` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout used in training (no effect at inference).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names the adapter applies to ("q_proj", "v_proj", ...).
    pub target_modules: Vec<String>,
    /// Bias training mode; only "none" is supported.
    #[serde(default = "none")]
    pub bias: String,
    /// Whether weights are stored `(in, out)`; only false (Llama's layout) is supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Rank-stabilised scaling `lora_alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Written as true: the adapter is for inference.
    #[serde(default)]
    pub inference_mode: bool,
}

fn lora() -> String {
    "LORA".into()
}

fn none() -> String {
    "none".into()
}

impl PeftLoraConfig {
    /// A plain LoRA configuration for a causal LM.
    pub fn new(r: usize, lora_alpha: f64, targets: &[Projection]) -> Self {
        Self {
            peft_type: lora(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: targets
                .iter()
                .map(|p| module_name(*p).to_string())
                .collect(),
            bias: none(),
            fan_in_fan_out: false,
            use_rslora: false,
            inference_mode: true,
        }
    }

    /// The factor of `B A` for a pair of rank `r`.
    pub fn scale(&self, r: usize) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (r as f64).sqrt()
        } else {
            self.lora_alpha / r as f64
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(RankerError::InvalidAdapter(m));
        if self.peft_type != "LORA" {
            return bad(format!("peft_type {:?} is not LORA", self.peft_type));
        }
        if self.r == 0 {
            return bad("r must be at least 1".into());
        }
        if self.bias != "none" {
            return bad(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out = true is not supported".into());
        }
        if let Some(m) = self.target_modules.iter().find(|m| projection(m).is_none()) {
            return bad(format!("target module {m:?} is not a Llama projection"));
        }
        Ok(())
    }
}

/// The last component of a projection's module path ("q_proj"), as in `target_modules`.
fn module_name(p: Projection) -> &'static str {
    p.module_path().rsplit('.').next().unwrap_or_default()
}

fn projection(module: &str) -> Option<Projection> {
    Projection::ALL
        .into_iter()
        .find(|p| module_name(*p) == module)
}

fn tensor_name(layer: usize, proj: Projection, half: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{half}.weight",
        proj.module_path()
    )
}

/// Loads a PEFT LoRA adapter directory for a model of shape `cfg`, tensors converted to
/// `dtype` on `device`. Every tensor of the file must be a LoRA pair of a target module.
pub fn load_adapter(
    dir: &Path,
    cfg: &LlamaConfig,
    device: &Device,
    dtype: DType,
) -> Result<(LoraAdapter, PeftLoraConfig)> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    for path in [&config_path, &weights_path] {
        if !path.exists() {
            return Err(RankerError::InvalidAdapter(format!(
                "{} not found",
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(&config_path).map_err(|source| RankerError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: PeftLoraConfig = serde_json::from_str(&text)
        .map_err(|e| RankerError::InvalidAdapter(format!("{}: {e}", config_path.display())))?;
    config.check()?;
    let tensors = candle_core::safetensors::load(&weights_path, device)
        .map_err(|e| RankerError::InvalidAdapter(format!("{}: {e}", weights_path.display())))?;
    let mut adapter = LoraAdapter::new();
    let mut used = std::collections::HashSet::new();
    for layer in 0..cfg.num_layers {
        for proj in Projection::ALL {
            let a = tensors.get(&tensor_name(layer, proj, "A"));
            let b = tensors.get(&tensor_name(layer, proj, "B"));
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (None, None) => continue,
                _ => {
                    return Err(RankerError::InvalidAdapter(format!(
                        "layer {layer} {}: lora_A and lora_B must both be present",
                        proj.module_path()
                    )))
                }
            };
            if !config.target_modules.iter().any(|m| m == module_name(proj)) {
                return Err(RankerError::InvalidAdapter(format!(
                    "layer {layer} has tensors for {} which is not in target_modules",
                    module_name(proj)
                )));
            }
            let r = a.dim(0)?;
            // PEFT builds every pair with the config's rank and refuses a file whose tensors
            // disagree; the scale would otherwise silently follow the tensors, not the config.
            if r != config.r {
                return Err(RankerError::InvalidAdapter(format!(
                    "layer {layer} {}: lora_A has rank {r}, but {} says r = {} (per-module ranks, PEFT's rank_pattern, are not supported)",
                    proj.module_path(),
                    config_path.display(),
                    config.r
                )));
            }
            let pair = crate::lora::LoraPair {
                a: a.to_dtype(dtype)?,
                b: b.to_dtype(dtype)?,
                scale: config.scale(r),
            };
            adapter.insert(cfg, layer, proj, pair)?;
            used.insert(tensor_name(layer, proj, "A"));
            used.insert(tensor_name(layer, proj, "B"));
        }
    }
    let mut unused: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
    unused.sort();
    if let Some(first) = unused.first() {
        return Err(RankerError::InvalidAdapter(format!(
            "{}: {} tensors are not LoRA pairs of this model's layers, e.g. {first}",
            weights_path.display(),
            unused.len()
        )));
    }
    if adapter.is_empty() {
        return Err(RankerError::InvalidAdapter(format!(
            "{}: no LoRA tensors",
            weights_path.display()
        )));
    }
    Ok((adapter, config))
}

/// Writes `adapter` as a PEFT LoRA adapter directory (created if missing). `config.r`,
/// `lora_alpha` and `target_modules` must describe the adapter: every pair's rank is `r` and its
/// scale is `config.scale(r)`.
pub fn save_adapter(dir: &Path, adapter: &LoraAdapter, config: &PeftLoraConfig) -> Result<()> {
    config.check()?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for ((layer, proj), pair) in adapter.pairs() {
        let r = pair.a.dim(0)?;
        if r != config.r {
            return Err(RankerError::InvalidAdapter(format!(
                "layer {layer} {proj:?} has rank {r}, config says {}",
                config.r
            )));
        }
        if (pair.scale - config.scale(r)).abs() > 1e-9 * config.scale(r).abs().max(1.0) {
            return Err(RankerError::InvalidAdapter(format!(
                "layer {layer} {proj:?} has scale {}, config gives {}",
                pair.scale,
                config.scale(r)
            )));
        }
        if !config
            .target_modules
            .iter()
            .any(|m| m == module_name(*proj))
        {
            return Err(RankerError::InvalidAdapter(format!(
                "{} is not in target_modules",
                module_name(*proj)
            )));
        }
        tensors.insert(tensor_name(*layer, *proj, "A"), pair.a.contiguous()?);
        tensors.insert(tensor_name(*layer, *proj, "B"), pair.b.contiguous()?);
    }
    std::fs::create_dir_all(dir).map_err(|source| RankerError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
    let json = serde_json::to_string_pretty(config)
        .map_err(|e| RankerError::InvalidAdapter(e.to_string()))?;
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, json).map_err(|source| RankerError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn tiny() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            vocab_size: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_seq_len: 64,
        }
    }

    fn values(n: usize, seed: f32) -> Vec<u8> {
        (0..n)
            .flat_map(|i| (seed + i as f32 * 0.01).to_le_bytes())
            .collect()
    }

    /// Writes a PEFT-layout directory the way PEFT does (safetensors crate, F32, PEFT names and
    /// a config with PEFT's extra fields), with q_proj and v_proj pairs of rank 2 in both layers.
    fn write_peft_dir(dir: &Path, extra_tensor: Option<&str>) {
        let cfg = tiny();
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for layer in 0..2 {
            for (proj, out) in [
                (Projection::QProj, cfg.q_dim()),
                (Projection::VProj, cfg.kv_dim()),
            ] {
                data.push((
                    tensor_name(layer, proj, "A"),
                    vec![2, 8],
                    values(16, layer as f32),
                ));
                data.push((
                    tensor_name(layer, proj, "B"),
                    vec![out, 2],
                    values(out * 2, 0.5),
                ));
            }
        }
        if let Some(name) = extra_tensor {
            data.push((name.to_string(), vec![2], values(2, 0.0)));
        }
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(n, shape, bytes)| {
                (
                    n.clone(),
                    TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(WEIGHTS_FILE)).unwrap();
        let config = r#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layers_pattern": null,
            "layers_to_transform": null, "lora_alpha": 32, "lora_dropout": 0.05, "modules_to_save": null, "peft_type": "LORA",
            "r": 2, "rank_pattern": {}, "revision": null, "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM",
            "use_dora": false, "use_rslora": false}"#;
        std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    }

    #[test]
    fn loads_a_peft_directory_and_saves_the_same_layout() {
        let dir = tempfile::tempdir().unwrap();
        write_peft_dir(dir.path(), None);
        let (adapter, config) =
            load_adapter(dir.path(), &tiny(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            (config.r, config.lora_alpha, config.task_type.as_deref()),
            (2, 32.0, Some("CAUSAL_LM"))
        );
        assert_eq!(adapter.pairs().count(), 4);
        let q1 = adapter.get(1, Projection::QProj).unwrap();
        assert_eq!(q1.scale, 16.0);
        assert_eq!(q1.a.dims(), &[2, 8]);
        assert_eq!(
            q1.a.flatten_all().unwrap().to_vec1::<f32>().unwrap()[1],
            1.01
        );
        assert!(adapter.get(0, Projection::KProj).is_none());

        let out = tempfile::tempdir().unwrap();
        save_adapter(out.path(), &adapter, &config).unwrap();
        let (again, config_again) =
            load_adapter(out.path(), &tiny(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(config_again, config);
        for ((layer, proj), pair) in adapter.pairs() {
            let other = again.get(*layer, *proj).unwrap();
            let diff = (&pair.b - &other.b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!((diff, pair.scale), (0.0, other.scale));
        }
        // PEFT reads the names straight from the file.
        let bytes = std::fs::read(out.path().join(WEIGHTS_FILE)).unwrap();
        let names = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .len();
        assert_eq!(names, 8);
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        let dir = tempfile::tempdir().unwrap();
        write_peft_dir(dir.path(), Some("base_model.model.lm_head.weight"));
        let e = load_adapter(dir.path(), &tiny(), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lm_head"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_peft_dir(dir.path(), None);
        let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE))
            .unwrap()
            .replace("\"none\"", "\"all\"");
        std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        let e = load_adapter(dir.path(), &tiny(), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias"), "{e}");

        let e = load_adapter(Path::new("/nonexistent"), &tiny(), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("adapter_config.json not found"), "{e}");

        // Saving checks the adapter against its configuration.
        let dir = tempfile::tempdir().unwrap();
        write_peft_dir(dir.path(), None);
        let (adapter, _) = load_adapter(dir.path(), &tiny(), &Device::Cpu, DType::F32).unwrap();
        let both = [Projection::QProj, Projection::VProj];
        let e = save_adapter(dir.path(), &adapter, &PeftLoraConfig::new(4, 32.0, &both))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2, config says 4"), "{e}");
        let e = save_adapter(
            dir.path(),
            &adapter,
            &PeftLoraConfig::new(2, 32.0, &[Projection::QProj]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("v_proj is not in target_modules"), "{e}");
    }
}
