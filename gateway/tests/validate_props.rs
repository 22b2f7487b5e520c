//! Property tests of the gateway's request validation with arbitrary input: arbitrary unicode,
//! control characters, empty and oversized strings, counts around and far beyond the limits.
//! Every request is either accepted with every limit holding (checked by an independent
//! oracle), or refused with INVALID_ARGUMENT whose message names a field, stays short (no
//! unbounded echo) and, for a size limit, names the configuration key.

use gateway::catalog::Catalog;
use gateway::config::GatewayConfig;
use gateway::error::GatewayError;
use gateway::validate;
use llamarec_common::data::{Dataset, Item};
use llamarec_proto::v1::{AppendEventsRequest, Event, GetHistoryRequest, InlineHistory, RecommendOptions, RecommendRequest};
use proptest::prelude::*;

const CATALOG_ITEMS: usize = 50;

fn catalog() -> Catalog {
    let items = std::iter::once(Item { id: String::new(), title: String::new() })
        .chain((1..=CATALOG_ITEMS).map(|i| Item { id: i.to_string(), title: format!("Movie {i} (1999)") }))
        .collect();
    Catalog::from_dataset(&Dataset { name: "props".into(), items, users: Vec::new() })
}

/// Small limits, so that random counts cross them often; the default configuration is also
/// exercised by `default_limits_hold`.
fn config() -> GatewayConfig {
    GatewayConfig {
        max_user_id_len: 16,
        max_item_id_len: 8,
        max_events_per_call: 8,
        max_inline_history: 8,
        max_k: 50,
        max_candidates: 20,
        default_candidates: 20,
        max_history: 40,
        ..Default::default()
    }
}

/// Strings that matter to validation: empty, ids from the catalog, arbitrary unicode with
/// control characters and special-token text, and long runs.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (1..=CATALOG_ITEMS + 5).prop_map(|i| i.to_string()),
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![any::<char>(), Just('\n'), Just('\0'), Just('\u{7f}'), Just('\u{202e}'), Just('é')],
            0..40
        )
        .prop_map(|cs| cs.into_iter().collect()),
        Just("<|im_start|>".to_string()),
        (0usize..5000).prop_map(|n| "9".repeat(n)),
    ]
}

fn count(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![0..=max + 2, Just(0), 0..=max * 40]
}

fn events(max: usize) -> impl Strategy<Value = Vec<Event>> {
    count(max).prop_flat_map(|n| proptest::collection::vec((text(), any::<i64>()).prop_map(|(item_id, timestamp_ms)| Event { item_id, timestamp_ms }), n))
}

fn number() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), 1u32..=60, any::<u32>()]
}

fn recommend_request() -> impl Strategy<Value = RecommendRequest> {
    (text(), number(), events(8), proptest::option::of(count(8).prop_flat_map(|n| proptest::collection::vec(text(), n))), proptest::option::of((number(), any::<bool>())))
        .prop_map(|(user_id, k, append_events, inline, options)| RecommendRequest {
            user_id,
            k,
            append_events,
            inline_history: inline.map(|item_ids| InlineHistory { item_ids }),
            options: options.map(|(num_candidates, skip_ranker)| RecommendOptions { num_candidates, skip_ranker }),
        })
}

/// The rules, written out independently of the implementation.
fn user_ok(c: &GatewayConfig, u: &str) -> bool {
    !u.is_empty() && u.len() <= c.max_user_id_len && !u.chars().any(char::is_control)
}

fn id_ok(c: &GatewayConfig, cat: &Catalog, id: &str) -> bool {
    id.len() <= c.max_item_id_len && cat.contains(id)
}

fn events_ok(c: &GatewayConfig, cat: &Catalog, events: &[Event]) -> bool {
    events.len() <= c.max_events_per_call && events.iter().all(|e| id_ok(c, cat, &e.item_id))
}

const FIELDS: [&str; 5] = ["user_id", "k ", "options.num_candidates", "append_events", "inline_history.item_ids"];

fn check_message(e: GatewayError, fields: &[&str]) -> Result<(), TestCaseError> {
    let GatewayError::InvalidArgument(m) = e else {
        return Err(TestCaseError::fail(format!("not INVALID_ARGUMENT: {e}")));
    };
    prop_assert!(fields.iter().any(|f| m.starts_with(f)), "message names no field: {m:?}");
    // Quoted ids are cut to 64 characters: the message stays short whatever was sent.
    prop_assert!(m.len() <= 1000, "message of {} bytes", m.len());
    if m.contains("the limit is") {
        prop_assert!(m.contains("([gateway] max_"), "size message without its key: {m:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn recommend_is_accepted_exactly_when_every_limit_holds(req in recommend_request()) {
        let (c, cat) = (config(), catalog());
        let n_requested = req.options.as_ref().map_or(0, |o| o.num_candidates);
        let inline_ok = match &req.inline_history {
            None => true,
            Some(h) => req.append_events.is_empty() && h.item_ids.len() <= c.max_inline_history && h.item_ids.iter().all(|i| id_ok(&c, &cat, i)),
        };
        let expected = user_ok(&c, &req.user_id)
            && (1..=c.max_k).contains(&req.k)
            && (n_requested == 0 || n_requested <= c.max_candidates)
            && events_ok(&c, &cat, &req.append_events)
            && inline_ok;
        match validate::recommend(&c, &cat, &req) {
            Ok(plan) => {
                prop_assert!(expected, "accepted an invalid request: {req:?}");
                prop_assert_eq!(plan.k, req.k as usize);
                let want = if n_requested == 0 { c.default_candidates } else { n_requested };
                prop_assert_eq!(plan.num_candidates, want as usize);
            }
            Err(e) => {
                prop_assert!(!expected, "refused a valid request: {e}");
                check_message(e, &FIELDS)?;
            }
        }
    }

    #[test]
    fn append_events_is_accepted_exactly_when_every_limit_holds(user_id in text(), events in events(8)) {
        let (c, cat) = (config(), catalog());
        let expected = user_ok(&c, &user_id) && !events.is_empty() && events_ok(&c, &cat, &events);
        let req = AppendEventsRequest { user_id, events };
        match validate::append_events(&c, &cat, &req) {
            Ok(()) => prop_assert!(expected, "accepted an invalid request"),
            Err(e) => {
                prop_assert!(!expected, "refused a valid request: {e}");
                check_message(e, &["user_id", "events"])?;
            }
        }
    }

    #[test]
    fn get_history_is_accepted_exactly_when_every_limit_holds(user_id in text(), limit in prop_oneof![number(), 35u32..=45]) {
        let c = config();
        let expected = user_ok(&c, &user_id) && limit as usize <= c.max_history;
        match validate::get_history(&c, &GetHistoryRequest { user_id, limit }) {
            Ok(()) => prop_assert!(expected, "accepted an invalid request"),
            Err(e) => {
                prop_assert!(!expected, "refused a valid request: {e}");
                let m = e.to_string();
                prop_assert!(!m.starts_with("limit") || m.contains("0..=40") && m.contains("([gateway] max_history)"), "{m}");
                check_message(e, &["user_id", "limit "])?;
            }
        }
    }

    #[test]
    fn default_limits_hold(req in recommend_request(), many in 0usize..600) {
        // The shipped defaults, with event counts around max_events_per_call (256).
        let c = GatewayConfig::default();
        let cat = catalog();
        let mut req = req;
        req.append_events = (0..many).map(|i| Event { item_id: (1 + i % CATALOG_ITEMS).to_string(), timestamp_ms: i as i64 }).collect();
        if let Ok(plan) = validate::recommend(&c, &cat, &req) {
            prop_assert!(req.append_events.len() <= c.max_events_per_call);
            prop_assert!(req.user_id.len() <= c.max_user_id_len && plan.k <= c.max_k as usize && plan.num_candidates <= c.max_candidates as usize);
        } else if let Err(e) = validate::recommend(&c, &cat, &req) {
            check_message(e, &FIELDS)?;
        }
    }
}
