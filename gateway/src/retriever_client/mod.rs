//! The gateway's client of the retriever: a Recommend's candidates, asked for within the
//! retriever's share of the caller's deadline. Histories go as dense catalog indices when the
//! retriever shares the gateway's catalog ([`dense`]), as ids otherwise; concurrent calls are
//! coalesced into RetrieveBatch calls under load ([`batching`]). Every failure is a
//! [`GatewayError`]: without candidates there is nothing to answer.

pub mod batching;
pub mod dense;
pub mod fallback;

use crate::catalog::Catalog;
use crate::config::GatewayConfig;
use crate::deadline::{within_budget, Deadline};
use crate::error::{GatewayError, RetrieverCallError};
use crate::merge::Retrieved;
use batching::RetrieverCalls;
use dense::DenseIndices;
use llamarec_proto::v1::{ModelVersion, RetrieveRequest, RetrieveResponse};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

/// The retriever as a Recommend sees it.
pub struct Retriever {
    calls: RetrieverCalls,
    catalog: Arc<Catalog>,
    dense: DenseIndices,
    /// `[gateway] retriever`, named in errors.
    address: String,
    /// `[gateway] retrieve_budget_ms`.
    budget: Duration,
}

impl Retriever {
    /// Over `calls`, resolving indices with `catalog`, as `config` says.
    pub fn new(calls: RetrieverCalls, catalog: Arc<Catalog>, config: &GatewayConfig) -> Self {
        let dense = DenseIndices::new(config.retrieve_dense_indices, catalog.fingerprint());
        Self { calls, catalog, dense, address: config.retriever.clone(), budget: Duration::from_millis(config.retrieve_budget_ms) }
    }

    /// Top `want` candidates for `history` (external ids, oldest first; `indices`: the same as
    /// dense indices when the user-history cache has them). Sends dense indices when the
    /// retriever shares the gateway's catalog, ids otherwise or after it refused indices.
    pub async fn candidates(
        &self,
        history: &[&str],
        indices: Option<&[u32]>,
        want: usize,
        deadline: &Deadline,
        request_id: &str,
    ) -> Result<(Vec<Retrieved>, ModelVersion), GatewayError> {
        let dense = self.dense.fingerprint().and_then(|fingerprint| {
            // An id the catalog lacks (the data set changed under a stored history) goes as an
            // id, so the retriever names it in its error.
            let indices: Option<Vec<u32>> = match indices {
                Some(known) => Some(known.to_vec()),
                None => history.iter().map(|id| self.catalog.index_of(id)).collect(),
            };
            indices.map(|history_indices| RetrieveRequest { history_indices, catalog_fingerprint: fingerprint, indices_only: true, ..Default::default() })
        });
        if let Some(request) = dense {
            let nonempty = !request.history_indices.is_empty();
            match self.call(request, want, deadline, request_id).await {
                Err(GatewayError::Retriever { status, .. }) if status.code() == Code::FailedPrecondition => self.dense.refused(status.message()),
                // A retriever that ignores indices (older than the field) sees an empty history.
                Ok(response) if response.popularity_fallback && nonempty => self.dense.refused("the retriever ignored history_indices"),
                Ok(response) => return self.resolve_indices(response),
                Err(e) => return Err(e),
            }
        }
        let request = RetrieveRequest { history: history.iter().map(|id| id.to_string()).collect(), ..Default::default() };
        let response = self.call(request, want, deadline, request_id).await?;
        let items = response.items.into_iter().map(|i| Retrieved { item_id: i.item_id, title: i.title, score: i.score }).collect();
        Ok((items, response.model.unwrap_or_default()))
    }

    /// Candidates of an `indices_only` answer, with ids and titles from the gateway's catalog.
    fn resolve_indices(&self, response: RetrieveResponse) -> Result<(Vec<Retrieved>, ModelVersion), GatewayError> {
        let items = response
            .items
            .into_iter()
            .map(|i| match self.catalog.item(i.item_index) {
                Some(item) => Ok(Retrieved { item_id: item.id.clone(), title: item.title.clone(), score: i.score }),
                None => Err(self.failed(RetrieverCallError::IndexOutsideCatalog { index: i.item_index, catalog_len: self.catalog.len() }.into())),
            })
            .collect::<Result<_, _>>()?;
        Ok((items, response.model.unwrap_or_default()))
    }

    /// One Retrieve call within the retriever's share of `deadline`.
    async fn call(&self, request: RetrieveRequest, want: usize, deadline: &Deadline, request_id: &str) -> Result<RetrieveResponse, GatewayError> {
        let budget = deadline.remaining().min(self.budget);
        if budget.is_zero() {
            return Err(GatewayError::Deadline(deadline.elapsed().as_millis() as u64));
        }
        let request = RetrieveRequest { k: want as u32, exclude_history: true, ..request };
        match within_budget(budget, self.calls.retrieve(request, budget, request_id)).await {
            Some(Ok(r)) => Ok(r),
            Some(Err(status)) => Err(self.failed(status)),
            None => Err(self.failed(RetrieverCallError::Timeout(budget.as_millis()).into())),
        }
    }

    fn failed(&self, status: Status) -> GatewayError {
        GatewayError::Retriever { address: self.address.clone(), status }
    }
}
