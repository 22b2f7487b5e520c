//! Request validation: every limit comes from configuration, and every violation names the
//! field and the limit.

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use llamarec_proto::v1::Event;

fn invalid(msg: String) -> GatewayError {
    GatewayError::InvalidArgument(msg)
}

/// A non-empty user id within the length limit and without control characters.
pub fn user_id(config: &GatewayConfig, user_id: &str) -> Result<(), GatewayError> {
    if user_id.is_empty() {
        return Err(invalid("user_id: must not be empty".into()));
    }
    if user_id.len() > config.max_user_id_len {
        return Err(invalid(format!("user_id: {} bytes, at most {} allowed", user_id.len(), config.max_user_id_len)));
    }
    if user_id.chars().any(char::is_control) {
        return Err(invalid("user_id: must not contain control characters".into()));
    }
    Ok(())
}

/// k within 1 ..= max_k.
pub fn k(config: &GatewayConfig, k: u32) -> Result<usize, GatewayError> {
    if k == 0 || k > config.max_k {
        return Err(invalid(format!("k: {k} is out of range 1..={}", config.max_k)));
    }
    Ok(k as usize)
}

/// Number of candidates to rank: 0 means the default; at most max_candidates.
pub fn num_candidates(config: &GatewayConfig, requested: u32) -> Result<usize, GatewayError> {
    let n = if requested == 0 { config.default_candidates } else { requested };
    if n > config.max_candidates {
        return Err(invalid(format!(
            "options.num_candidates: {n} exceeds the {} candidates the ranker can letter",
            config.max_candidates
        )));
    }
    Ok(n as usize)
}

/// Events: within the per-call limit, every item in the catalog.
pub fn events(config: &GatewayConfig, catalog: &Catalog, field: &str, events: &[Event]) -> Result<(), GatewayError> {
    if events.len() > config.max_events_per_call {
        return Err(invalid(format!("{field}: {} events, at most {} per call", events.len(), config.max_events_per_call)));
    }
    item_ids(catalog, field, events.iter().map(|e| e.item_id.as_str()))
}

/// Every id in the catalog; the first unknown one is named.
pub fn item_ids<'a>(catalog: &Catalog, field: &str, ids: impl IntoIterator<Item = &'a str>) -> Result<(), GatewayError> {
    for (i, id) in ids.into_iter().enumerate() {
        if !catalog.contains(id) {
            let shown: String = id.chars().take(64).collect();
            return Err(invalid(format!("{field}[{i}]: unknown item id {shown:?}")));
        }
    }
    Ok(())
}
