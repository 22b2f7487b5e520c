//! One module per subcommand.

pub mod admin;
pub mod bench;
pub mod calibrate;
pub mod config;
pub mod data;
pub mod eval;
pub mod eval_report;
pub mod eval_retriever;
pub mod eval_two_stage;
pub mod export_examples;
pub mod fetch;
pub mod gateway_access;
pub mod health;
pub mod json;
pub mod learning_curve;
pub mod rank;
pub mod recommend;
pub mod reload;
pub mod replay;
pub mod score_prompt;
pub mod serve;
pub mod split;
pub mod traffic;
pub mod train;
pub mod train_ranker;
pub mod up;
