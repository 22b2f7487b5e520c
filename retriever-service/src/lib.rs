//! The first stage of LlamaRec: a sequential recommender that turns a user's history into the
//! candidates the LLM ranks. Two model families, named by a checkpoint's `config.json`
//! ([`config::ModelKind`]): LRURec (the paper's, linear recurrent units) and SASRec (causal
//! self-attention).
//!
//! - Training (candle, CPU), all under [`train`]: [`train::model::LruRec`] runs the recurrence
//!   as a log-depth parallel scan ([`train::scan`]), [`train::sasrec::SasRec`] is the attention
//!   graph, [`train::sequence_model::SequenceModel`] either one; [`train::train`] is the loop,
//!   writing a [`checkpoint`] directory that serving reads. Serving never calls into `train`
//!   (only the `[retriever.train]` recipe type lives there, for the config section).
//! - Serving (plain Rust over contiguous f32): [`encoder::Encoder`] runs the same recurrence step
//!   by step into a per-user [`state::UserState`] (SASRec: re-encodes the window,
//!   [`sasrec_encoder`]); [`topk`] scores the catalog in blocks with a
//!   bounded heap (with an int8 pass and exact re-scoring for large catalogs, [`quantized`]);
//!   [`retriever::Retriever`] ties them to a checkpoint, or to an [`ensemble`] of checkpoints
//!   (members' scores averaged).
//! - Serving over gRPC: [`service`] (the `llamarec.v1.Retriever` handlers), [`server`] (start-up,
//!   health, drain, SIGHUP), [`reload`] (the served model's atomic swap), configured by the `[retriever]` section ([`service_config`]).

pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod encoder;
pub mod ensemble;
pub mod error;
pub mod kernels;
pub mod quantized;
pub mod reload;
pub mod retriever;
pub mod sasrec_encoder;
pub mod server;
pub mod service;
pub mod service_config;
pub mod state;
pub mod state_cache;
pub mod topk;
pub mod train;

pub use catalog::{Catalog, CatalogItem};
pub use config::{LruRecConfig, ModelKind};
pub use encoder::Encoder;
pub use error::{Result, RetrieverError};
pub use retriever::{CandidateSource, Retrieval, Retriever};
pub use state::UserState;
pub use topk::Candidate;
pub use train::{train, TrainConfig, TrainReport};
