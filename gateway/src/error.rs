//! The gateway's errors and their one mapping to gRPC status codes.

use crate::history::StoreError;
use tonic::{Code, Status};

/// Everything a gateway call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed; the message names the field and the limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// Too many requests in flight.
    #[error("gateway at capacity ({0} requests in flight); retry with backoff")]
    Overloaded(usize),
    /// The history store failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The retriever failed; without candidates there is nothing to return.
    #[error("retriever {address}: {}", status.message())]
    Retriever {
        /// The retriever's address.
        address: String,
        /// What it answered (or the transport error).
        status: Status,
    },
    /// The caller's deadline passed before the retriever answered.
    #[error("deadline exceeded after {0} ms before candidates were retrieved")]
    Deadline(u64),
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        // The retriever refusing the gateway's own credentials is a deployment error, not the
        // caller's: never UNAUTHENTICATED (the caller would blame its own token).
        if let GatewayError::Retriever { status, .. } = &e {
            if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied) {
                return Status::internal(format!("{e} (the gateway's backend_token does not match the retriever's auth_token)"));
            }
        }
        let code = match &e {
            GatewayError::InvalidArgument(_) => Code::InvalidArgument,
            GatewayError::Overloaded(_) => Code::ResourceExhausted,
            GatewayError::Store(_) => Code::Unavailable,
            GatewayError::Retriever { status, .. } => match status.code() {
                // A request the retriever rejects passed our own validation: report it as is.
                Code::InvalidArgument => Code::InvalidArgument,
                Code::DeadlineExceeded | Code::Cancelled => Code::DeadlineExceeded,
                _ => Code::Unavailable,
            },
            GatewayError::Deadline(_) => Code::DeadlineExceeded,
        };
        Status::new(code, e.to_string())
    }
}
