//! The ranker's errors: the library's own ([`RankerError`]) and the service's (a Rank call's
//! [`ServiceError`], a Reload's [`ReloadError`], shared with the other model service and mapped in
//! `llamarec_common::reload`), with the one mapping of the service's errors
//! to gRPC status codes.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::queue::QueueError;

/// Everything that can go wrong while loading the ranker's model or scoring a request.
///
/// Variants are grouped so the gRPC layer can map them in one place: the request-shaped ones
/// (see [`RankerError::is_invalid_argument`]) become `INVALID_ARGUMENT`; the rest are internal.
#[derive(Debug, thiserror::Error)]
pub enum RankerError {
    /// A model or tokenizer file does not exist.
    #[error("model file {path} not found; run `llamarec fetch` to download the shipped model")]
    ModelNotFound {
        /// The path that was looked up.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The weights or their metadata do not describe a model we can run.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A LoRA adapter does not fit the model.
    #[error("invalid LoRA adapter: {0}")]
    InvalidAdapter(String),
    /// A prompt template is unusable (e.g. a placeholder is missing).
    #[error("invalid prompt template: {0}")]
    InvalidTemplate(String),
    /// The request has no candidates.
    #[error("candidate_titles is empty; at least one candidate is required")]
    NoCandidates,
    /// The request has more candidates than the template has index letters.
    #[error("candidate_titles has {given} titles; the limit is {max} (the template's index letters)")]
    TooManyCandidates {
        /// Number of candidates in the request.
        given: usize,
        /// Number of letters the verbalizer knows.
        max: usize,
    },
    /// A history or candidate title is empty (after trimming).
    #[error("{kind}_titles[{index}] is empty")]
    EmptyTitle {
        /// "history" or "candidate".
        kind: &'static str,
        /// Zero-based position in the request.
        index: usize,
    },
    /// A request field is over a configured limit; the message names the field, its size and
    /// the limit's key.
    #[error("{0}")]
    OverLimit(String),
    /// The rendered prompt is longer than the model's context (or the configured limit).
    #[error("the prompt is {tokens} tokens; the limit is {max} ([ranker] max_prompt_tokens, else the model's context length)")]
    ContextOverflow {
        /// Prompt length in tokens.
        tokens: usize,
        /// The longest prompt accepted.
        max: usize,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl RankerError {
    /// True for errors caused by the request's content (map to gRPC `INVALID_ARGUMENT`).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(
            self,
            Self::NoCandidates
                | Self::TooManyCandidates { .. }
                | Self::EmptyTitle { .. }
                | Self::ContextOverflow { .. }
                | Self::OverLimit(_)
        )
    }
}

/// Result alias for the ranker crate.
pub type Result<T> = std::result::Result<T, RankerError>;

/// Everything a Rank call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed; the message names the problem.
    #[error("{0}")]
    InvalidArgument(RankerError),
    /// The queue is full.
    #[error("ranker at capacity ({0} requests queued or computing); retry with backoff")]
    Overloaded(usize),
    /// The queue has stopped (the server is shutting down).
    #[error("ranker unavailable: {0}")]
    Unavailable(String),
    /// The model or the tokenizer failed.
    #[error("ranking failed: {0}")]
    Internal(String),
}

impl From<RankerError> for ServiceError {
    fn from(e: RankerError) -> Self {
        if e.is_invalid_argument() {
            Self::InvalidArgument(e)
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<QueueError> for ServiceError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Overloaded { capacity } => Self::Overloaded(capacity),
            QueueError::Backend(m) => Self::Internal(m),
            QueueError::Closed => Self::Unavailable(e.to_string()),
        }
    }
}

pub use llamarec_common::reload::ReloadError;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::Overloaded(_) => Code::ResourceExhausted,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
