//! Ensemble checkpoints: a directory whose `ensemble.json` names member checkpoint directories,
//! served as one model that scores each item with the mean of the members' scores
//! ([`Encoder::ensemble`]: equal weights, fixed in advance rather than fitted on a split).
//!
//! | file | content |
//! |---|---|
//! | `ensemble.json` | [`EnsembleManifest`]: member directories, relative to this one |
//! | `report.json` | [`EnsembleReport`] (written by `llamarec train retriever --seeds`) |
//! | `<member>/` | an ordinary checkpoint directory each ([`crate::checkpoint`]) |
//!
//! Members must share the catalog (the same `items.json`); they may be of different families
//! (LRURec and SASRec) and shapes.

use crate::catalog::Catalog;
use crate::checkpoint::{read_json, Checkpoint, MODEL_FILE};
use crate::encoder::Encoder;
use crate::error::{Result, RetrieverError};
use crate::train::{DataSummary, TrainConfig};
use llamarec_common::ranking_metrics::MetricReport;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};

/// The manifest's file name.
pub const ENSEMBLE_FILE: &str = "ensemble.json";

/// `ensemble.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleManifest {
    /// Member checkpoint directories, relative to the ensemble's directory (inside it).
    pub members: Vec<PathBuf>,
}

/// One member in an ensemble's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberSummary {
    /// Directory, relative to the ensemble's.
    pub dir: PathBuf,
    /// Seed of its training run.
    pub seed: u64,
    /// The recipe file added to the ensemble's recipe (`--recipe-seeds`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// Its best epoch and the epochs it ran.
    pub best_epoch: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Its wall time to the best epoch, seconds.
    pub time_to_best_s: f64,
    /// Its own validation metrics.
    pub validation: MetricReport,
}

/// `report.json` of an ensemble trained by `llamarec train retriever --seeds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleReport {
    /// Data statistics (as a member's report).
    pub data: DataSummary,
    /// The members' shared recipe (the seed varies; a member with a `recipe` file has that
    /// file's keys on top, and its own `report.json` has its full recipe).
    pub config: TrainConfig,
    /// Members, in the manifest's order.
    pub members: Vec<MemberSummary>,
    /// Members trained at the same time.
    pub parallel: usize,
    /// Wall time from the first member's start to the last member's end, seconds: the
    /// ensemble's time to its best checkpoint (every member stops at its own best). Of this
    /// run only: a resumed run does not know how long the interrupted one ran side by side
    /// (each member's own `report.json` counts its whole time).
    pub wall_time_s: f64,
    /// Validation metrics of the ensemble.
    pub validation: MetricReport,
    /// Test metrics of the ensemble (computed once, after training).
    pub test: MetricReport,
}

/// Whether `dir` holds an ensemble rather than a single model.
pub fn is_ensemble(dir: &Path) -> bool {
    dir.join(ENSEMBLE_FILE).is_file()
}

/// The member directories `dir/ensemble.json` names, checked to be non-empty and inside `dir`.
pub fn member_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join(ENSEMBLE_FILE);
    let manifest: EnsembleManifest = read_json(&path)?;
    let bad = |reason: String| Err(RetrieverError::Checkpoint { path: path.clone(), reason });
    if manifest.members.is_empty() {
        return bad("no member".into());
    }
    let mut dirs = Vec::with_capacity(manifest.members.len());
    for member in &manifest.members {
        // Members live inside the ensemble's directory, so that it can be copied, versioned and
        // mounted as one unit.
        if !member.components().all(|c| matches!(c, Component::Normal(_))) {
            return bad(format!("member {} must be a relative path inside the ensemble's directory", member.display()));
        }
        dirs.push(dir.join(member));
    }
    Ok(dirs)
}

/// Loads every member of the ensemble in `dir` and combines them; the catalog is the members'.
pub fn load(dir: &Path) -> Result<(Encoder, Catalog)> {
    let mut encoders = Vec::new();
    let mut catalog: Option<Catalog> = None;
    for member in member_dirs(dir)? {
        let checkpoint = Checkpoint::load(&member)?;
        match &catalog {
            Some(first) if first.fingerprint() != checkpoint.catalog.fingerprint() => {
                return Err(RetrieverError::Checkpoint {
                    path: member,
                    reason: "its items.json differs from the first member's: members must share the catalog".into(),
                })
            }
            Some(_) => {}
            None => catalog = Some(checkpoint.catalog),
        }
        encoders.push(Encoder::new(&checkpoint.config, &checkpoint.tensors)?);
    }
    let catalog = catalog.expect("member_dirs returns at least one member");
    Ok((Encoder::ensemble(encoders)?, catalog))
}

/// The files whose bytes define the served model, in a fixed order: for a single checkpoint its
/// `model.safetensors`; for an ensemble its manifest and each member's weights.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !is_ensemble(dir) {
        return Ok(vec![dir.join(MODEL_FILE)]);
    }
    let mut files = vec![dir.join(ENSEMBLE_FILE)];
    files.extend(member_dirs(dir)?.into_iter().map(|m| m.join(MODEL_FILE)));
    Ok(files)
}
