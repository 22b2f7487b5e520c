//! Data sets for sequential recommendation, preprocessed exactly as LlamaRec does.
//!
//! Every loader produces [`RawInteractions`] (external ids, titles, timestamps); [`preprocess`]
//! turns them into a [`Dataset`]: untitled items dropped, 5-core filtering iterated to a fixed
//! point, interactions sorted by (timestamp, item id), ids re-indexed densely from 1 (0 is
//! padding), and per-user sequences ready for the leave-one-out split.

mod amazon;
mod movielens;
mod preprocess;
mod recbole;
mod source;
mod titles;

pub use amazon::load_amazon;
pub use movielens::load_movielens;
pub use preprocess::{preprocess, RawInteraction, RawInteractions};
pub use recbole::load_recbole;
pub use source::{DataConfig, DataFormat};
pub use titles::clean_title;

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Errors while reading or preprocessing a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A data file could not be opened or read.
    #[error("cannot read {path}: {source} (run `llamarec fetch` for the shipped data set)")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a data file could not be parsed.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// Nothing survived preprocessing.
    #[error("data set {0} is empty after dropping untitled items and 5-core filtering")]
    Empty(String),
}

/// One catalog item after re-indexing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Item {
    /// The item's id in the source data set.
    pub id: String,
    /// Cleaned title ("The Godfather (1972)").
    pub title: String,
}

/// Fingerprint of a catalog's items in dense order (`ids` = the ids of items 1, 2, …): the first
/// 8 bytes of SHA-256 over each id followed by a newline, big-endian. Two services exchange dense
/// item indices instead of ids only when their fingerprints agree.
pub fn catalog_fingerprint<'a>(ids: impl IntoIterator<Item = &'a str>) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.as_bytes());
        hasher.update(b"\n");
    }
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// One user's interactions after preprocessing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserHistory {
    /// The user's id in the source data set.
    pub id: String,
    /// Dense item indices (1-based), sorted by (timestamp, item id).
    pub items: Vec<u32>,
    /// Timestamps (seconds since the epoch) parallel to `items`.
    pub timestamps: Vec<i64>,
}

/// Which part of each user's sequence a computation uses (leave-one-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Everything but the last two items.
    Train,
    /// Predict the second-to-last item from everything before it.
    Validation,
    /// Predict the last item from everything before it.
    Test,
}

/// A preprocessed data set: catalog plus per-user chronological sequences.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Name from the configuration, e.g. "ml-100k".
    pub name: String,
    /// Catalog; `items[0]` is the padding item, real items are `1..=num_items()`.
    pub items: Vec<Item>,
    /// Users in order of their first appearance in the source file.
    pub users: Vec<UserHistory>,
}

/// One evaluation example: a user's input history and the item to predict.
#[derive(Debug, Clone, Copy)]
pub struct EvalExample<'a> {
    /// Index into [`Dataset::users`].
    pub user: usize,
    /// The history the model sees, oldest first.
    pub history: &'a [u32],
    /// The held-out item.
    pub target: u32,
}

/// Summary statistics printed by `llamarec data stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Data set name.
    pub name: String,
    /// Number of users.
    pub users: usize,
    /// Number of items (padding excluded).
    pub items: usize,
    /// Number of interactions.
    pub interactions: usize,
    /// Mean sequence length per user.
    pub avg_sequence_length: f64,
    /// Longest sequence.
    pub max_sequence_length: usize,
    /// Fraction of the user×item matrix that is filled.
    pub density: f64,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "validation" | "val" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split {other:?}: expected train, validation or test")),
        }
    }
}

impl Dataset {
    /// Loads and preprocesses the configured data set; relative paths resolve against `assets_dir`.
    pub fn load(config: &DataConfig, assets_dir: &Path) -> Result<Self, DataError> {
        let raw = config.load_raw(assets_dir)?;
        preprocess(&config.name, raw)
    }

    /// Number of real items (padding excluded).
    pub fn num_items(&self) -> usize {
        self.items.len() - 1
    }

    /// The training part of a user's sequence: all but the last two items.
    pub fn train_sequence(&self, user: usize) -> &[u32] {
        let items = &self.users[user].items;
        &items[..items.len().saturating_sub(2)]
    }

    /// Leave-one-out examples of a split, one per user, in user order. `Split::Train` yields the
    /// last training item predicted from the rest.
    pub fn eval_examples(&self, split: Split) -> impl Iterator<Item = EvalExample<'_>> + '_ {
        let held_out = match split {
            Split::Test => 1,
            Split::Validation => 2,
            Split::Train => 3,
        };
        self.users.iter().enumerate().filter_map(move |(user, u)| {
            let n = u.items.len();
            (n > held_out).then(|| EvalExample {
                user,
                history: &u.items[..n - held_out],
                target: u.items[n - held_out],
            })
        })
    }

    /// Item popularity over the training sequences only (index 0 unused), so that the test and
    /// validation items never leak into the popularity fallback.
    pub fn train_popularity(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.items.len()];
        for user in 0..self.users.len() {
            for &item in self.train_sequence(user) {
                counts[item as usize] += 1;
            }
        }
        counts
    }

    /// Users, items, interactions and sequence lengths.
    pub fn stats(&self) -> DatasetStats {
        let interactions: usize = self.users.iter().map(|u| u.items.len()).sum();
        let users = self.users.len();
        DatasetStats {
            name: self.name.clone(),
            users,
            items: self.num_items(),
            interactions,
            avg_sequence_length: interactions as f64 / users.max(1) as f64,
            max_sequence_length: self.users.iter().map(|u| u.items.len()).max().unwrap_or(0),
            density: interactions as f64 / (users.max(1) * self.num_items().max(1)) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::catalog_fingerprint;

    #[test]
    fn catalog_fingerprint_sees_order_and_id_boundaries() {
        let base = catalog_fingerprint(["a", "bc"]);
        assert_eq!(base, catalog_fingerprint(["a", "bc"]));
        assert_ne!(base, catalog_fingerprint(["bc", "a"]), "dense order is part of the catalog");
        assert_ne!(base, catalog_fingerprint(["ab", "c"]), "ids are separated, not concatenated");
        assert_ne!(base, catalog_fingerprint(["a", "bc", "d"]));
        // `printf 'a\nbc\n' | sha256sum` starts with these 8 bytes: what other implementations
        // (a Python client, a future retriever) must reproduce.
        assert_eq!(base, 0x4b8d_1dd1_e2b9_7bee);
    }
}
