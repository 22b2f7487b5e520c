//! One module per subcommand.

pub mod bench;
pub mod data;
pub mod eval;
pub mod fetch;
pub mod json;
pub mod recommend;
pub mod serve;
pub mod up;
