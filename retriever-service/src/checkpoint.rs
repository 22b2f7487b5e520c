//! The checkpoint directory.
//!
//! | file | content |
//! |---|---|
//! | `model.safetensors` | weights of the best epoch (by validation Recall@10) |
//! | `config.json` | [`LruRecConfig`] |
//! | `items.json` | [`CatalogItem`]s by dense index, entry 0 = padding |
//! | `report.json` | [`crate::train::TrainReport`] |
//! | `last.safetensors`, `optimizer.safetensors`, `trainer_state.json` | where training resumes |

use crate::catalog::{Catalog, CatalogItem};
use crate::config::LruRecConfig;
use crate::error::{Result, RetrieverError};
use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// Best weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// Model hyper-parameters.
pub const CONFIG_FILE: &str = "config.json";
/// Catalog.
pub const ITEMS_FILE: &str = "items.json";
/// Training report.
pub const REPORT_FILE: &str = "report.json";
/// Weights after the latest epoch (resume point).
pub const LAST_MODEL_FILE: &str = "last.safetensors";
/// Optimiser moments after the latest epoch.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Epoch counters and early-stopping state.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Writes `value` as pretty JSON, through a temporary file so that an interrupted run never
/// leaves a truncated file behind.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(RetrieverError::json(path))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(RetrieverError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(RetrieverError::io(path))
}

/// Reads a JSON file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(RetrieverError::io(path))?;
    serde_json::from_str(&text).map_err(RetrieverError::json(path))
}

/// Everything serving needs from a checkpoint directory.
pub struct Checkpoint {
    /// Model hyper-parameters.
    pub config: LruRecConfig,
    /// Item catalog.
    pub catalog: Catalog,
    /// Weights by name.
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads `model.safetensors`, `config.json` and `items.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config: LruRecConfig = read_json(&dir.join(CONFIG_FILE))?;
        config.validate()?;
        let items: Vec<CatalogItem> = read_json(&dir.join(ITEMS_FILE))?;
        if items.len() != config.vocab_size() {
            return Err(RetrieverError::Checkpoint {
                path: dir.join(ITEMS_FILE),
                reason: format!("{} entries, but config.json says {} items plus padding", items.len(), config.num_items),
            });
        }
        let tensors = load_tensors(&dir.join(MODEL_FILE), &Device::Cpu)?;
        Ok(Self { config, catalog: Catalog::new(items), tensors })
    }
}

/// Reads all tensors of a safetensors file.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(RetrieverError::Checkpoint { path: path.to_path_buf(), reason: "file not found".into() });
    }
    // candle's error ("incomplete metadata, file not fully covered") does not say which file;
    // a refused reload or start must.
    candle_core::safetensors::load(path, device)
        .map_err(|e| RetrieverError::Checkpoint { path: path.to_path_buf(), reason: format!("not a readable safetensors file: {e}") })
}
