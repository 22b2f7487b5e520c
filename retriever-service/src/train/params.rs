//! Named trainable parameters: creation (fresh or from a checkpoint), weight-decay groups,
//! safetensors persistence.

use crate::error::{Result, RetrieverError};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// One trainable tensor and its name in the safetensors file.
#[derive(Debug, Clone)]
pub struct Param {
    /// Name in the checkpoint, e.g. `blocks.0.lru.in_proj.weight`.
    pub name: String,
    /// The tensor (shared with the layer that uses it).
    pub var: Var,
}

impl Param {
    /// Whether AdamW decays this parameter: biases and layer norms are exempt, as in the
    /// reference trainer (decaying a norm's gain towards 0 fights the normalisation).
    pub fn decays(&self) -> bool {
        !(self.name.contains("bias") || self.name.contains("layer_norm"))
    }
}

/// Where the values of new parameters come from.
pub enum ParamSource<'a, R: rand::Rng> {
    /// Fresh initialisation from this random generator.
    Init(&'a mut R),
    /// Tensors read from a checkpoint, by name.
    Load(&'a HashMap<String, Tensor>),
}

/// How to initialise a parameter when it is created fresh.
pub enum Init {
    /// Truncated normal with the given standard deviation.
    TruncatedNormal(f64),
    /// Every element equal to this value.
    Constant(f32),
    /// Ring initialisation of a (3, H) `params_log` tensor: rows ν_log, θ_log, γ_log.
    Ring {
        /// Smallest |λ|.
        r_min: f64,
        /// Largest |λ|.
        r_max: f64,
    },
}

/// All parameters of a model, in creation order.
pub struct ParamStore<'a, R: rand::Rng> {
    source: ParamSource<'a, R>,
    device: Device,
    params: Vec<Param>,
}

impl<'a, R: rand::Rng> ParamStore<'a, R> {
    /// An empty store that initialises or loads parameters from `source`.
    pub fn new(source: ParamSource<'a, R>, device: &Device) -> Self {
        Self { source, device: device.clone(), params: Vec::new() }
    }

    /// Creates (or loads) the parameter `name` of shape `shape`.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        let n: usize = shape.iter().product();
        let tensor = match &mut self.source {
            ParamSource::Init(rng) => {
                let values = match init {
                    Init::TruncatedNormal(std) => crate::train::init::truncated_normal(*rng, n, std),
                    Init::Constant(c) => vec![c; n],
                    Init::Ring { r_min, r_max } => crate::train::init::ring(*rng, n / 3, r_min, r_max).concat(),
                };
                Tensor::from_vec(values, shape, &self.device)?
            }
            ParamSource::Load(tensors) => {
                let t = tensors.get(name).ok_or_else(|| RetrieverError::Checkpoint {
                    path: "model.safetensors".into(),
                    reason: format!("missing tensor {name}"),
                })?;
                if t.dims() != shape {
                    return Err(RetrieverError::Checkpoint {
                        path: "model.safetensors".into(),
                        reason: format!("tensor {name} has shape {:?}, the config implies {shape:?}", t.dims()),
                    });
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
        };
        let var = Var::from_tensor(&tensor)?;
        self.params.push(Param { name: name.to_string(), var: var.clone() });
        Ok(var)
    }

    /// The parameters created so far.
    pub fn into_params(self) -> Vec<Param> {
        self.params
    }
}

/// A model whose parameters all come from a [`ParamStore`]: the same `build` makes it fresh
/// (seeded) or from a checkpoint's tensors, so parameter names cannot drift between the two.
pub trait BuildFromParams: Sized {
    /// Creates every parameter through `store`.
    fn build<R: rand::Rng>(config: &crate::config::LruRecConfig, store: ParamStore<'_, R>) -> Result<Self>;

    /// A freshly initialised model; the same `seed` gives the same weights.
    fn init(config: &crate::config::LruRecConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::SeedableRng;
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::build(config, ParamStore::new(ParamSource::Init(&mut rng), device))
    }

    /// A model with the given tensors (e.g. read from `model.safetensors`).
    fn from_tensors(config: &crate::config::LruRecConfig, tensors: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        config.validate()?;
        Self::build(config, ParamStore::<rand::rngs::StdRng>::new(ParamSource::Load(tensors), device))
    }
}

/// Writes parameters to a safetensors file.
pub fn save(params: &[Param], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}
