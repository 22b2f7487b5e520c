//! The trainable retriever model, whichever family the configuration names: what the training
//! loop, batched evaluation and the checkpoint tests work with.

use crate::config::{LruRecConfig, ModelKind};
use crate::train::dropout::DropoutRng;
use crate::train::model::LruRec;
use crate::train::params::{BuildFromParams, Param};
use crate::train::sasrec::SasRec;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// An LRURec or a SASRec training graph.
#[derive(Debug, Clone)]
pub enum SequenceModel {
    /// Linear recurrent units.
    LruRec(LruRec),
    /// Causal self-attention.
    SasRec(SasRec),
}

impl SequenceModel {
    /// A freshly initialised model of `config.kind`; the same `seed` gives the same weights.
    pub fn init(config: &LruRecConfig, seed: u64, device: &Device) -> crate::Result<Self> {
        Ok(match config.kind {
            ModelKind::LruRec => Self::LruRec(LruRec::init(config, seed, device)?),
            ModelKind::SasRec => Self::SasRec(SasRec::init(config, seed, device)?),
        })
    }

    /// A model of `config.kind` with the given tensors.
    pub fn from_tensors(config: &LruRecConfig, tensors: &HashMap<String, Tensor>, device: &Device) -> crate::Result<Self> {
        Ok(match config.kind {
            ModelKind::LruRec => Self::LruRec(LruRec::from_tensors(config, tensors, device)?),
            ModelKind::SasRec => Self::SasRec(SasRec::from_tensors(config, tensors, device)?),
        })
    }

    /// Reads a model of `config.kind` from a safetensors file.
    pub fn load(config: &LruRecConfig, path: &Path, device: &Device) -> crate::Result<Self> {
        Self::from_tensors(config, &crate::checkpoint::load_tensors(path, device)?, device)
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LruRecConfig {
        match self {
            Self::LruRec(m) => &m.config,
            Self::SasRec(m) => &m.config,
        }
    }

    /// All trainable parameters with their checkpoint names.
    pub fn params(&self) -> &[Param] {
        match self {
            Self::LruRec(m) => m.params(),
            Self::SasRec(m) => m.params(),
        }
    }

    /// Hidden states (batch, length, D) for left-padded item indices (0 = padding); dropout
    /// when `rng` is given.
    pub fn forward(&self, tokens: &Tensor, rng: Option<&mut DropoutRng>) -> candle_core::Result<Tensor> {
        match self {
            Self::LruRec(m) => m.forward(tokens, rng),
            Self::SasRec(m) => m.forward(tokens, rng),
        }
    }

    /// Scores of every item (padding included) for hidden states (N, D).
    pub fn scores(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::LruRec(m) => m.scores(hidden),
            Self::SasRec(m) => m.scores(hidden),
        }
    }

    /// Writes the weights to a safetensors file.
    pub fn save(&self, path: &Path) -> crate::Result<()> {
        crate::train::params::save(self.params(), path)
    }

    /// Weights by name, for the serving encoder.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params().iter().map(|p| (p.name.clone(), p.var.as_tensor().detach())).collect()
    }
}
