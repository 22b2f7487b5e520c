//! The retriever library's error type.

use std::path::PathBuf;

/// Everything that can go wrong while training, loading or serving the retriever.
#[derive(Debug, thiserror::Error)]
pub enum RetrieverError {
    /// A tensor operation failed (shape mismatch, bad dtype, ...).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A checkpoint or report file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file of the checkpoint is malformed.
    #[error("malformed JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The checkpoint is internally inconsistent or lacks a tensor.
    #[error("invalid checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model or training hyper-parameter is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A history refers to an item index outside the catalog.
    #[error("item index {index} is outside the catalog (valid: 1..={num_items})")]
    UnknownItem {
        /// The offending dense index.
        index: u32,
        /// Number of real items in the catalog.
        num_items: usize,
    },
    /// The training data has no usable sequence.
    #[error("no training data: {0}")]
    NoData(String),
}

/// Result alias of this crate.
pub type Result<T, E = RetrieverError> = std::result::Result<T, E>;

impl RetrieverError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RetrieverError::Io { path, source }
    }

    /// Wraps a JSON error with the path it concerns.
    pub(crate) fn json(path: impl Into<PathBuf>) -> impl FnOnce(serde_json::Error) -> Self {
        let path = path.into();
        move |source| RetrieverError::Json { path, source }
    }
}
