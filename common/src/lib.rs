//! Code that more than one llamarec crate needs: data sets and their preprocessing, ranking
//! metrics, the layered configuration, asset fetching and telemetry set-up.

pub mod assets;
pub mod auth;
pub mod config;
pub mod data;
pub mod fusion;
pub mod metrics;
pub mod serving;
pub mod telemetry;
