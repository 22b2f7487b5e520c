//! The in-process retriever: checkpoint → history → state → top-k candidates.

use crate::catalog::Catalog;
use crate::checkpoint::Checkpoint;
use crate::encoder::Encoder;
use crate::error::Result;
use crate::quantized::QuantizedEmbedding;
use crate::state::UserState;
use crate::state_cache::StateCache;
use crate::topk::{top_k, Candidate};
use std::path::Path;

/// Catalogs at least this large are scored on several threads; below it, spawning threads
/// costs more than the scoring.
const PARALLEL_SCORING_MIN_ITEMS: usize = 100_000;

/// Catalogs at least this large keep an int8 copy of the item embeddings and scan it first
/// (exact f32 results, a quarter of the memory traffic; see [`crate::quantized`]).
pub const QUANTIZED_SCORING_MIN_ITEMS: usize = 100_000;

/// Largest catalog (items × embedding dimension multiply-adds, ~50 µs) that
/// [`Retriever::retrieve_if_cheap`] scores on the caller's thread.
const CHEAP_SCORING_MAX_MACS: usize = 1 << 19;

/// Items re-scored in f32 after the int8 scan (at least k).
const SHORTLIST: usize = 256;

/// Where a candidate list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateSource {
    /// LRURec scores.
    Model,
    /// Training popularity: the history was empty.
    Popularity,
}

/// The answer to one retrieval.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    /// Candidates, best first.
    pub candidates: Vec<Candidate>,
    /// How they were chosen.
    pub source: CandidateSource,
}

/// A loaded LRURec checkpoint ready to answer retrievals.
pub struct Retriever {
    encoder: Encoder,
    catalog: Catalog,
    scoring_threads: usize,
    quantized: Option<QuantizedEmbedding>,
    states: Option<StateCache>,
}

impl Retriever {
    /// Loads the checkpoint directory `dir` (a single model, or an ensemble's manifest and
    /// members: [`crate::ensemble`]).
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::ensemble::is_ensemble(dir) {
            let (encoder, catalog) = crate::ensemble::load(dir)?;
            return Ok(Self::new(encoder, catalog));
        }
        let checkpoint = Checkpoint::load(dir)?;
        Ok(Self::new(Encoder::new(&checkpoint.config, &checkpoint.tensors)?, checkpoint.catalog))
    }

    /// A retriever over an encoder and its catalog (which must have the same number of items).
    pub fn new(encoder: Encoder, catalog: Catalog) -> Self {
        assert_eq!(encoder.config().num_items, catalog.num_items(), "encoder and catalog disagree on the item count");
        let scoring_threads = if catalog.num_items() >= PARALLEL_SCORING_MIN_ITEMS {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            1
        };
        let quantized = (catalog.num_items() >= QUANTIZED_SCORING_MIN_ITEMS)
            .then(|| QuantizedEmbedding::new(encoder.embedding(), encoder.config().embed_dim));
        Self { encoder, catalog, scoring_threads, quantized, states: None }
    }

    /// Keeps up to `capacity_bytes` of recent user states (see [`crate::state_cache`]); 0 turns
    /// the cache off. Results are the same with or without it.
    pub fn with_state_cache(mut self, capacity_bytes: u64) -> Self {
        self.states = (capacity_bytes > 0).then(|| StateCache::new(capacity_bytes));
        self
    }

    /// The state cache, when enabled.
    pub fn state_cache(&self) -> Option<&StateCache> {
        self.states.as_ref()
    }

    /// Turns the int8 first pass on or off, whatever the catalog size (results are the same).
    pub fn with_quantized_scoring(mut self, enabled: bool) -> Self {
        self.quantized = enabled.then(|| QuantizedEmbedding::new(self.encoder.embedding(), self.encoder.config().embed_dim));
        self
    }

    /// Overrides the number of threads used to score the catalog.
    pub fn with_scoring_threads(mut self, threads: usize) -> Self {
        self.scoring_threads = threads.max(1);
        self
    }

    /// The item catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The encoder (model weights and hyper-parameters).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The state after the last `max_len` events of `history` (what the model was trained on).
    pub fn state(&self, history: &[u32]) -> Result<UserState> {
        let max_len = self.encoder.config().max_len;
        let window = &history[history.len().saturating_sub(max_len)..];
        match &self.states {
            Some(cache) => {
                let (state, outcome) = cache.state(&self.encoder, window)?;
                metrics::counter!("llamarec_retriever_state_cache_total", "outcome" => outcome.as_str()).increment(1);
                Ok(state)
            }
            None => self.encoder.encode(window),
        }
    }

    /// The `k` best items after `history` (dense indices, oldest first), with the history's
    /// items left out when `exclude_history`. An empty history gets the most popular items.
    pub fn retrieve(&self, history: &[u32], k: usize, exclude_history: bool) -> Result<Retrieval> {
        let state = self.state(history)?;
        Ok(self.retrieve_for_state(&state, if exclude_history { history } else { &[] }, k))
    }

    /// [`Retriever::retrieve`], but only when it is cheap: the history's state is cached (no
    /// recurrence to run) and the catalog is small enough to score in tens of microseconds.
    /// A server answers these on its async threads; a hand-off to a blocking thread would cost
    /// more than the work. `None`: not cheap, nothing computed.
    pub fn retrieve_if_cheap(&self, history: &[u32], k: usize, exclude_history: bool) -> Option<Retrieval> {
        let config = self.encoder.config();
        if history.is_empty() || self.catalog.num_items() * config.embed_dim > CHEAP_SCORING_MAX_MACS {
            return None;
        }
        let window = &history[history.len().saturating_sub(config.max_len)..];
        let state = self.states.as_ref()?.get(window)?;
        metrics::counter!("llamarec_retriever_state_cache_total", "outcome" => "hit").increment(1);
        Some(self.retrieve_for_state(&state, if exclude_history { history } else { &[] }, k))
    }

    /// The `k` best items for a state already computed (e.g. kept between requests and advanced
    /// with [`Encoder::push`]), leaving out `excluded`.
    pub fn retrieve_for_state(&self, state: &UserState, excluded: &[u32], k: usize) -> Retrieval {
        if state.is_empty() {
            let candidates = self
                .catalog
                .popular()
                .iter()
                .filter(|i| !excluded.contains(i))
                .take(k)
                .map(|&item| Candidate { item, score: self.catalog.item(item).map_or(0.0, |i| i.train_count as f32) })
                .collect();
            return Retrieval { candidates, source: CandidateSource::Popularity };
        }
        let (query, embedding, bias) = (&state.output, self.encoder.embedding(), self.encoder.output_bias());
        let candidates = match &self.quantized {
            Some(q) => q.top_k(query, embedding, bias, k, excluded, self.scoring_threads, SHORTLIST),
            None => top_k(query, embedding, bias, k, excluded, self.scoring_threads),
        };
        Retrieval { candidates, source: CandidateSource::Model }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogItem;
    use crate::encoder::tests::small_model;

    fn retriever(cache_bytes: u64) -> Retriever {
        let model = small_model(3);
        let encoder = Encoder::new(&model.config, &model.tensors()).unwrap();
        let items = (0..=model.config.num_items)
            .map(|i| CatalogItem { id: if i == 0 { String::new() } else { format!("i{i}") }, title: format!("Title {i}"), train_count: i as u32 })
            .collect();
        Retriever::new(encoder, Catalog::new(items)).with_state_cache(cache_bytes)
    }

    #[test]
    fn cheap_retrievals_are_only_those_with_a_cached_state_and_equal_the_full_path() {
        let cached = retriever(1 << 20);
        let history = [3, 9, 27, 4, 4, 12];
        assert_eq!(cached.retrieve_if_cheap(&history, 5, true), None, "nothing cached yet");
        let full = cached.retrieve(&history, 5, true).unwrap();
        let cheap = cached.retrieve_if_cheap(&history, 5, true).expect("cached after the first retrieval");
        assert_eq!(cheap, full);
        assert!(cheap.candidates.iter().all(|c| !history.contains(&c.item)), "history excluded");
        assert_eq!(cached.retrieve_if_cheap(&history[..5], 5, true), None, "a different window");
        assert_eq!(cached.retrieve_if_cheap(&[], 5, true), None, "popularity goes the usual way");
        let uncached = retriever(0);
        uncached.retrieve(&history, 5, true).unwrap();
        assert_eq!(uncached.retrieve_if_cheap(&history, 5, true), None, "no cache, never cheap");
    }
}
