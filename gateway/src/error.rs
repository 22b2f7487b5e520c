//! The gateway's errors and their one mapping to gRPC status codes: what a gateway call fails
//! with ([`GatewayError`]), and what goes wrong on the gateway's side of a retriever call
//! ([`RetrieverCallError`]).

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
    /// No admin token is configured: the admin RPCs (GetSplit, SetSplit) are refused outright.
    #[error(
        "the admin RPCs are disabled on this gateway: no admin tokens are configured; set \
         `[gateway] admin_tokens_file` (LLAMAREC_GATEWAY__ADMIN_TOKENS_FILE) to a file of tokens, \
         restart it, and send one as `authorization: Bearer <token>`"
    )]
    AdminDisabled,
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
            GatewayError::AdminDisabled => Code::PermissionDenied,
        };
        Status::new(code, e.to_string())
    }
}

/// What goes wrong on the gateway's side of a retriever call. Each becomes the status that call
/// ends with, as if the retriever had answered it, so that these and the retriever's own
/// answers meet the same rules: the popular fallback's codes, the dense-index refusal, and
/// `From<GatewayError> for Status` above.
#[derive(Debug, thiserror::Error)]
pub enum RetrieverCallError {
    /// No answer within the retriever's share of the deadline (milliseconds).
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// An `indices_only` answer named an index outside the gateway's catalog.
    #[error("answered item index {index} outside the catalog of {catalog_len} items")]
    IndexOutsideCatalog {
        /// The index answered.
        index: u32,
        /// Items in the gateway's catalog.
        catalog_len: usize,
    },
    /// The batching dispatcher's task has ended.
    #[error("the gateway's retriever dispatcher has stopped")]
    DispatcherStopped,
    /// The dispatcher let go of the request without an answer.
    #[error("the gateway's retriever dispatcher dropped the request")]
    DispatcherDropped,
    /// A RetrieveBatch answer with another number of results than the batch had requests.
    #[error("the retriever answered {answered} results to a batch of {sent}")]
    BatchLength {
        /// Results answered.
        answered: usize,
        /// Requests sent.
        sent: usize,
    },
    /// A RetrieveBatch result with neither a response nor an error.
    #[error("the retriever answered an empty result in a batch")]
    EmptyBatchResult,
}

impl From<RetrieverCallError> for Status {
    fn from(e: RetrieverCallError) -> Self {
        let code = match &e {
            RetrieverCallError::Timeout(_) => Code::DeadlineExceeded,
            RetrieverCallError::DispatcherStopped => Code::Unavailable,
            RetrieverCallError::IndexOutsideCatalog { .. }
            | RetrieverCallError::DispatcherDropped
            | RetrieverCallError::BatchLength { .. }
            | RetrieverCallError::EmptyBatchResult => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the caller of Recommend sees when a retriever call fails on the gateway's side.
    #[test]
    fn retriever_call_errors_keep_their_codes_and_reach_the_caller_as_before() {
        let cases = [
            (RetrieverCallError::Timeout(40), Code::DeadlineExceeded, "no answer within 40 ms", Code::DeadlineExceeded),
            (
                RetrieverCallError::IndexOutsideCatalog { index: 9, catalog_len: 5 },
                Code::Internal,
                "answered item index 9 outside the catalog of 5 items",
                Code::Unavailable,
            ),
            (RetrieverCallError::DispatcherStopped, Code::Unavailable, "the gateway's retriever dispatcher has stopped", Code::Unavailable),
            (RetrieverCallError::DispatcherDropped, Code::Internal, "the gateway's retriever dispatcher dropped the request", Code::Unavailable),
            (
                RetrieverCallError::BatchLength { answered: 2, sent: 3 },
                Code::Internal,
                "the retriever answered 2 results to a batch of 3",
                Code::Unavailable,
            ),
            (RetrieverCallError::EmptyBatchResult, Code::Internal, "the retriever answered an empty result in a batch", Code::Unavailable),
        ];
        for (error, code, message, caller_code) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
            let caller = Status::from(GatewayError::Retriever { address: "r:1".into(), status });
            assert_eq!((caller.code(), caller.message()), (caller_code, format!("retriever r:1: {message}").as_str()));
        }
    }
}
