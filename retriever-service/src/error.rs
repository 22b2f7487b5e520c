//! The retriever's errors: the library's own ([`RetrieverError`]) and the service's (a Retrieve
//! call's [`ServiceError`], a Reload's [`ReloadError`], shared with the other model service and mapped in
//! `llamarec_common::reload`), with the one mapping of the service's
//! errors to gRPC status codes.

use std::path::PathBuf;
use tonic::{Code, Status};

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

/// Everything a Retrieve call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed; the message names the field and the limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's dense indices refer to another catalog.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Too many requests in flight.
    #[error("retriever at capacity ({0} requests in flight); retry with backoff")]
    Overloaded(usize),
    /// The model failed or the compute task died.
    #[error("retrieval failed: {0}")]
    Internal(String),
}

pub use llamarec_common::reload::ReloadError;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Overloaded(_) => Code::ResourceExhausted,
            ServiceError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_errors_keep_their_codes_and_messages() {
        let cases: Vec<(Status, Code, &str)> = vec![
            (ServiceError::InvalidArgument("k is 0".into()).into(), Code::InvalidArgument, "k is 0"),
            (ServiceError::FailedPrecondition("other catalog".into()).into(), Code::FailedPrecondition, "other catalog"),
            (
                ServiceError::Overloaded(8).into(),
                Code::ResourceExhausted,
                "retriever at capacity (8 requests in flight); retry with backoff",
            ),
            (ServiceError::Internal("boom".into()).into(), Code::Internal, "retrieval failed: boom"),
        ];
        for (status, code, message) in cases {
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
