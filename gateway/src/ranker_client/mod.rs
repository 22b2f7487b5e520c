//! The gateway's client of the rankers: one Rank call for a Recommend's candidates, to a ranker
//! pod picked by [`pool`], within what is left of the caller's deadline. A ranker never fails a
//! Recommend: every failure is a [`Degraded`] reason and the answer keeps the retriever's order.

pub mod pool;

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::deadline::{within_budget, Deadline};
use crate::merge::{log_softmax, Ranked, Retrieved};
use llamarec_common::request_id::set_request_id;
use llamarec_proto::v1::{DegradedReason, ModelVersion, RankRequest};
use pool::{PickError, RankerPool};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Request};

/// Why the ranker's scores are missing.
#[derive(Debug, Clone, PartialEq)]
pub struct Degraded {
    /// What Recommend reports in `degraded_reason`.
    pub reason: DegradedReason,
    /// What it reports in `degraded_detail`.
    pub detail: String,
}

impl Degraded {
    fn new(reason: DegradedReason, detail: String) -> Self {
        Self { reason, detail }
    }
}

/// The one mapping from a failed Rank call's status code to the reason a Recommend is degraded
/// with. A timeout or an overloaded ranker says nothing about its health; anything else does
/// (the endpoint is avoided for a while).
pub fn degraded_reason(code: Code) -> DegradedReason {
    match code {
        Code::DeadlineExceeded | Code::Cancelled => DegradedReason::RankerTimeout,
        Code::ResourceExhausted => DegradedReason::Overload,
        _ => DegradedReason::RankerFailed,
    }
}

/// The rankers as a Recommend sees them.
pub struct Ranker {
    pool: Arc<RankerPool>,
    catalog: Arc<Catalog>,
    /// `[gateway] backend_token`.
    token: Option<String>,
    /// `[gateway] max_message_bytes`.
    max_message_bytes: usize,
    /// `[gateway] prompt_history`.
    prompt_history: usize,
    /// `[gateway] min_rank_budget_ms`.
    min_budget: Duration,
}

impl Ranker {
    /// Over the endpoints of `pool`, with titles from `catalog`, as `config` says.
    pub fn new(pool: Arc<RankerPool>, catalog: Arc<Catalog>, config: &GatewayConfig) -> Self {
        Self {
            pool,
            catalog,
            token: config.backend_token.clone(),
            max_message_bytes: config.max_message_bytes,
            prompt_history: config.prompt_history as usize,
            min_budget: Duration::from_millis(config.min_rank_budget_ms),
        }
    }

    /// Ranks `candidates` after `history` within what is left of `deadline`; on any failure
    /// returns why, never an error: the retriever's answer is kept whatever the ranker does.
    pub async fn rank(
        &self,
        history: &[&str],
        candidates: &[Retrieved],
        deadline: &Deadline,
        request_id: &str,
    ) -> Result<(Vec<Ranked>, ModelVersion), Degraded> {
        let budget = deadline.remaining();
        if budget < self.min_budget {
            return Err(Degraded::new(DegradedReason::RankerTimeout, format!("only {} ms of the deadline left for the ranker", budget.as_millis())));
        }
        self.call(self.request(history, candidates), budget, request_id).await
    }

    /// The Rank request for `candidates` after `history` (the last `prompt_history` titles).
    pub fn request(&self, history: &[&str], candidates: &[Retrieved]) -> RankRequest {
        let skip = history.len().saturating_sub(self.prompt_history);
        let history_titles = history[skip..].iter().filter_map(|&id| self.catalog.title(id).map(str::to_string)).collect();
        let candidate_titles = candidates.iter().map(|c| c.title.clone()).collect();
        RankRequest { history_titles, candidate_titles }
    }

    /// One Rank call to an endpoint picked from the pool, within `budget`; on any failure
    /// returns why (the reason a Recommend would be degraded with).
    pub async fn call(&self, rank_request: RankRequest, budget: Duration, request_id: &str) -> Result<(Vec<Ranked>, ModelVersion), Degraded> {
        let lease = match self.pool.pick() {
            Ok(lease) => lease,
            Err(PickError::Empty) => return Err(Degraded::new(DegradedReason::NoRanker, "no ranker endpoint configured or resolved".into())),
            // Beyond the rankers' capacity: answer at once in retriever order rather than queue.
            Err(PickError::AtCapacity { limit }) => {
                return Err(Degraded::new(
                    DegradedReason::Overload,
                    format!("every ranker endpoint has {limit} requests from this gateway in flight (rankers.max_in_flight_per_endpoint); ranker skipped"),
                ))
            }
        };
        let n = rank_request.candidate_titles.len();
        let mut request = Request::new(rank_request);
        request.set_timeout(budget);
        set_request_id(&mut request, request_id);
        llamarec_common::auth::set_bearer(request.metadata_mut(), self.token.as_deref());
        let mut client = lease.client().max_decoding_message_size(self.max_message_bytes);
        let response = match within_budget(budget, client.rank(request)).await {
            Some(Ok(r)) => {
                self.pool.report_success(&lease);
                r.into_inner()
            }
            Some(Err(status)) => {
                let reason = degraded_reason(status.code());
                if reason == DegradedReason::RankerFailed {
                    self.pool.report_failure(&lease);
                }
                return Err(Degraded::new(reason, format!("ranker {}: {}: {}", lease.address(), status.code(), status.message())));
            }
            None => {
                return Err(Degraded::new(DegradedReason::RankerTimeout, format!("ranker {} gave no answer within {} ms", lease.address(), budget.as_millis())))
            }
        };
        if response.scores.len() != n {
            self.pool.report_failure(&lease);
            return Err(Degraded::new(
                DegradedReason::RankerFailed,
                format!("ranker {} returned {} scores for {} candidates", lease.address(), response.scores.len(), n),
            ));
        }
        let logits: Vec<f32> = response.scores.iter().map(|s| s.logit).collect();
        let ranked = log_softmax(&logits).into_iter().zip(&logits).map(|(log_prob, &logit)| Ranked { logit, log_prob }).collect();
        Ok((ranked, response.model.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_degraded_reasons() {
        assert_eq!(degraded_reason(Code::DeadlineExceeded), DegradedReason::RankerTimeout);
        assert_eq!(degraded_reason(Code::Cancelled), DegradedReason::RankerTimeout);
        assert_eq!(degraded_reason(Code::ResourceExhausted), DegradedReason::Overload);
        for code in [Code::Unavailable, Code::Internal, Code::InvalidArgument, Code::Unauthenticated] {
            assert_eq!(degraded_reason(code), DegradedReason::RankerFailed, "{code:?}");
        }
    }
}
