//! Code that more than one llamarec crate needs: data sets and their preprocessing, ranking
//! metrics (Recall/NDCG/MRR, not Prometheus), the layered configuration, the server plumbing,
//! the request id, model labels, what hot reloads share, the seeded generator, what benchmarks measure, asset fetching and telemetry
//! set-up.

pub mod assets;
pub mod auth;
pub mod bench;
pub mod config;
pub mod data;
pub mod fusion;
pub mod model_label;
pub mod ranking_metrics;
pub mod reload;
pub mod request_id;
pub mod rng;
pub mod serving;
pub mod telemetry;

