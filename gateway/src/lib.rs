//! The LlamaRec gateway: validates requests, reads and appends user histories, fans out to the
//! retriever and the rankers within the caller's deadline, and merges both stages' scores.

pub mod canary;
pub mod capture;
pub mod catalog;
pub mod config;
pub mod deadline;
pub mod error;
pub mod history;
pub mod merge;
pub mod ranker_client;
pub mod retriever_client;
pub mod server;
pub mod service;
pub mod shadow;
pub mod traffic;
pub mod validate;
