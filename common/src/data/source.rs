//! Which data set to load, from the `[data]` section of the configuration.

use super::{load_amazon, load_movielens, load_recbole, DataError, RawInteractions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File layout of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// RecBole atomic files: `interactions` = `.inter`, `items` = `.item` (the shipped ML-100K).
    Recbole,
    /// MovieLens CSV: `interactions` = `ratings.csv`, `items` = `movies.csv`.
    Movielens,
    /// Amazon 2014: `interactions` = ratings CSV, `items` = metadata lines.
    Amazon,
}

/// The `[data]` configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Name used in reports and checkpoints.
    pub name: String,
    /// File layout.
    pub format: DataFormat,
    /// Interactions file; relative paths resolve against the assets directory.
    pub interactions: PathBuf,
    /// Item metadata file; relative paths resolve against the assets directory.
    pub items: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            name: "ml-100k".into(),
            format: DataFormat::Recbole,
            interactions: "ml-100k/ml-100k.inter".into(),
            items: "ml-100k/ml-100k.item".into(),
        }
    }
}

impl DataConfig {
    /// Reads the raw interactions and titles with the loader of `format`.
    pub fn load_raw(&self, assets_dir: &Path) -> Result<RawInteractions, DataError> {
        let interactions = assets_dir.join(&self.interactions);
        let items = assets_dir.join(&self.items);
        match self.format {
            DataFormat::Recbole => load_recbole(&interactions, &items),
            DataFormat::Movielens => load_movielens(&interactions, &items),
            DataFormat::Amazon => load_amazon(&interactions, &items),
        }
    }
}
