//! JSON views of API messages for `--json` output (prost types do not derive serde).

use llamarec_proto::v1::RecommendResponse;
use serde_json::{json, Value};

/// A Recommend response as JSON.
pub fn recommend_response(r: &RecommendResponse) -> Value {
    let t = r.timings.unwrap_or_default();
    json!({
        "request_id": r.request_id,
        "history_length": r.history_length,
        "degraded": r.degraded,
        "degraded_reason": r.degraded_reason().as_str_name(),
        "degraded_detail": r.degraded_detail,
        "retriever_model": r.retriever_model.as_ref().map(|m| json!({"name": m.name, "version": m.version})),
        "ranker_model": r.ranker_model.as_ref().map(|m| json!({"name": m.name, "version": m.version})),
        "timings_us": {"history": t.history_us, "retrieve": t.retrieve_us, "rank": t.rank_us, "total": t.total_us},
        "items": r.items.iter().map(|i| json!({
            "item_id": i.item_id,
            "title": i.title,
            "final_score": i.final_score,
            "retriever_score": i.retriever_score,
            "retriever_rank": i.retriever_rank,
            "ranker_log_prob": i.ranker_log_prob,
            "ranker_logit": i.ranker_logit,
        })).collect::<Vec<_>>(),
    })
}
