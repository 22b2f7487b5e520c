//! Request validation: every limit comes from configuration, and every violation is
//! INVALID_ARGUMENT naming the field, what it was and the limit with its configuration key,
//! e.g. "user_id is 300 bytes; the limit is 256 ([gateway] max_user_id_len)".
//!
//! Checks run cheapest first and never copy or echo unbounded input: lengths are compared
//! before contents are looked at, and an id quoted in a message is cut to 64 characters.
//! Message size is bounded before any of this by `max_message_bytes` on the server.

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use llamarec_proto::v1::{AppendEventsRequest, Event, GetHistoryRequest, RecommendRequest};

fn invalid(msg: String) -> GatewayError {
    GatewayError::InvalidArgument(msg)
}

/// "`field` is `n` `unit`; the limit is `limit` ([gateway] `key`)".
fn over(field: &str, n: usize, unit: &str, limit: usize, key: &str) -> GatewayError {
    invalid(format!("{field} is {n} {unit}; the limit is {limit} ([gateway] {key})"))
}

/// At most 64 characters of `s`, for messages.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A non-empty user id within the length limit and without control characters.
pub fn user_id(config: &GatewayConfig, user_id: &str) -> Result<(), GatewayError> {
    if user_id.is_empty() {
        return Err(invalid("user_id must not be empty".into()));
    }
    if user_id.len() > config.max_user_id_len {
        return Err(over("user_id", user_id.len(), "bytes", config.max_user_id_len, "max_user_id_len"));
    }
    if let Some(c) = user_id.chars().find(|c| c.is_control()) {
        return Err(invalid(format!("user_id must not contain control characters (found U+{:04X})", c as u32)));
    }
    Ok(())
}

/// k within 1 ..= max_k.
pub fn k(config: &GatewayConfig, k: u32) -> Result<usize, GatewayError> {
    if k == 0 || k > config.max_k {
        return Err(invalid(format!("k is {k}; it must be within 1..={} ([gateway] max_k)", config.max_k)));
    }
    Ok(k as usize)
}

/// Number of candidates to rank: 0 means the default; at most max_candidates.
pub fn num_candidates(config: &GatewayConfig, requested: u32) -> Result<usize, GatewayError> {
    let n = if requested == 0 { config.default_candidates } else { requested };
    if n > config.max_candidates {
        return Err(over("options.num_candidates", n as usize, "candidates", config.max_candidates as usize, "max_candidates"));
    }
    Ok(n as usize)
}

/// Events: within the per-call limit, every item id within its length limit and in the catalog.
pub fn events(config: &GatewayConfig, catalog: &Catalog, field: &str, events: &[Event]) -> Result<(), GatewayError> {
    if events.len() > config.max_events_per_call {
        return Err(over(field, events.len(), "events", config.max_events_per_call, "max_events_per_call"));
    }
    item_ids(config, catalog, field, events.iter().map(|e| e.item_id.as_str()))
}

/// Every id within the length limit and in the catalog; the first bad one is named.
pub fn item_ids<'a>(config: &GatewayConfig, catalog: &Catalog, field: &str, ids: impl IntoIterator<Item = &'a str>) -> Result<(), GatewayError> {
    for (i, id) in ids.into_iter().enumerate() {
        if id.len() > config.max_item_id_len {
            return Err(over(&format!("{field}[{i}]"), id.len(), "bytes", config.max_item_id_len, "max_item_id_len"));
        }
        if !catalog.contains(id) {
            return Err(invalid(format!("{field}[{i}]: unknown item id {:?}", shown(id))));
        }
    }
    Ok(())
}

/// What a valid Recommend asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecommendPlan {
    /// Items to return.
    pub k: usize,
    /// Candidates the ranker re-orders.
    pub num_candidates: usize,
}

/// A whole Recommend request: user id, k, candidates, events to append, and an inline history
/// (within `max_inline_history`, not combined with events).
pub fn recommend(config: &GatewayConfig, catalog: &Catalog, req: &RecommendRequest) -> Result<RecommendPlan, GatewayError> {
    user_id(config, &req.user_id)?;
    let k = k(config, req.k)?;
    let num_candidates = num_candidates(config, req.options.as_ref().map_or(0, |o| o.num_candidates))?;
    events(config, catalog, "append_events", &req.append_events)?;
    if let Some(inline) = &req.inline_history {
        if !req.append_events.is_empty() {
            return Err(invalid(
                "append_events cannot be combined with inline_history, which leaves the stored history untouched".into(),
            ));
        }
        if inline.item_ids.len() > config.max_inline_history {
            return Err(over("inline_history.item_ids", inline.item_ids.len(), "items", config.max_inline_history, "max_inline_history"));
        }
        item_ids(config, catalog, "inline_history.item_ids", inline.item_ids.iter().map(String::as_str))?;
    }
    Ok(RecommendPlan { k, num_candidates })
}

/// A whole AppendEvents request: user id and one to `max_events_per_call` valid events.
pub fn append_events(config: &GatewayConfig, catalog: &Catalog, req: &AppendEventsRequest) -> Result<(), GatewayError> {
    user_id(config, &req.user_id)?;
    if req.events.is_empty() {
        return Err(invalid("events: at least one event is required".into()));
    }
    events(config, catalog, "events", &req.events)
}

/// A whole GetHistory request: user id, and `limit` within 0 ..= max_history (0 means all; a
/// stored history never holds more than max_history events, so a larger limit is a mistake).
pub fn get_history(config: &GatewayConfig, req: &GetHistoryRequest) -> Result<(), GatewayError> {
    user_id(config, &req.user_id)?;
    if req.limit as usize > config.max_history {
        return Err(invalid(format!(
            "limit is {}; it must be within 0..={}, 0 meaning all ([gateway] max_history)",
            req.limit, config.max_history
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llamarec_common::data::{Dataset, Item};
    use llamarec_proto::v1::{InlineHistory, RecommendOptions};

    fn catalog() -> Catalog {
        let items = std::iter::once(Item { id: String::new(), title: String::new() })
            .chain((1..=5).map(|i| Item { id: i.to_string(), title: format!("Movie {i}") }))
            .collect();
        Catalog::from_dataset(&Dataset { name: "t".into(), items, users: Vec::new() })
    }

    fn msg(r: Result<impl std::fmt::Debug, GatewayError>) -> String {
        match r.unwrap_err() {
            GatewayError::InvalidArgument(m) => m,
            e => panic!("not INVALID_ARGUMENT: {e}"),
        }
    }

    #[test]
    fn messages_name_the_field_the_value_and_the_limit_key() {
        let c = GatewayConfig::default();
        let cat = catalog();
        let long = "u".repeat(300);
        assert_eq!(msg(user_id(&c, &long)), "user_id is 300 bytes; the limit is 256 ([gateway] max_user_id_len)");
        assert_eq!(msg(k(&c, 101)), "k is 101; it must be within 1..=100 ([gateway] max_k)");
        assert!(msg(num_candidates(&c, 21)).contains("options.num_candidates is 21 candidates; the limit is 20 ([gateway] max_candidates)"));
        let many: Vec<Event> = (0..257).map(|_| Event { item_id: "1".into(), timestamp_ms: 0 }).collect();
        assert_eq!(msg(events(&c, &cat, "events", &many)), "events is 257 events; the limit is 256 ([gateway] max_events_per_call)");
        let long_id = [Event { item_id: "9".repeat(129), timestamp_ms: 0 }];
        assert_eq!(msg(events(&c, &cat, "events", &long_id)), "events[0] is 129 bytes; the limit is 128 ([gateway] max_item_id_len)");
        let unknown = [Event { item_id: "1".into(), timestamp_ms: 0 }, Event { item_id: "x".repeat(100), timestamp_ms: 0 }];
        let m = msg(events(&c, &cat, "events", &unknown));
        assert!(m.starts_with("events[1]: unknown item id") && m.len() < 100, "{m}");
        assert!(msg(user_id(&c, "a\u{7}b")).contains("control characters"));
        assert!(msg(user_id(&c, "")).starts_with("user_id"));
    }

    #[test]
    fn whole_requests() {
        let c = GatewayConfig { max_inline_history: 3, ..Default::default() };
        let cat = catalog();
        let req = |inline: Option<Vec<&str>>, events: Vec<&str>| RecommendRequest {
            user_id: "42".into(),
            k: 5,
            append_events: events.into_iter().map(|i| Event { item_id: i.into(), timestamp_ms: 0 }).collect(),
            inline_history: inline.map(|ids| InlineHistory { item_ids: ids.into_iter().map(String::from).collect() }),
            options: Some(RecommendOptions { num_candidates: 0, skip_ranker: false }),
        };
        assert_eq!(recommend(&c, &cat, &req(None, vec!["1"])).unwrap(), RecommendPlan { k: 5, num_candidates: 20 });
        assert_eq!(recommend(&c, &cat, &req(Some(vec!["1", "2", "3"]), vec![])).unwrap().k, 5);
        assert!(msg(recommend(&c, &cat, &req(Some(vec!["1"; 4]), vec![]))).contains("([gateway] max_inline_history)"));
        assert!(msg(recommend(&c, &cat, &req(Some(vec!["1"]), vec!["2"]))).starts_with("append_events cannot be combined"));
        assert!(msg(recommend(&c, &cat, &req(Some(vec!["1", "zz"]), vec![]))).starts_with("inline_history.item_ids[1]"));
        let empty = AppendEventsRequest { user_id: "42".into(), events: vec![] };
        assert!(msg(append_events(&c, &cat, &empty)).starts_with("events"));
        assert!(get_history(&c, &GetHistoryRequest { user_id: "42".into(), limit: 7 }).is_ok());
    }

    #[test]
    fn get_history_limit_is_bounded_by_max_history() {
        let c = GatewayConfig { max_history: 50, ..Default::default() };
        let req = |limit: u32| GetHistoryRequest { user_id: "42".into(), limit };
        for ok in [0, 1, 50] {
            assert!(get_history(&c, &req(ok)).is_ok(), "{ok}");
        }
        assert_eq!(msg(get_history(&c, &req(51))), "limit is 51; it must be within 0..=50, 0 meaning all ([gateway] max_history)");
        assert!(msg(get_history(&c, &req(u32::MAX))).starts_with(&format!("limit is {}", u32::MAX)));
        assert!(msg(get_history(&c, &GetHistoryRequest { user_id: String::new(), limit: 0 })).starts_with("user_id"));
        assert!(msg(get_history(&GatewayConfig::default(), &req(1001))).contains("0..=1000"));
    }
}
