//! The model side of the service: runs batches of prepared requests on the ranker, starting
//! each from its user's cached history state when there is one, and caching the state of new
//! histories.

use std::sync::Arc;

use crate::history_cache::{history_key, HistoryCache};
use crate::kv_cache::KvCache;
use crate::metrics as m;
use crate::queue::Backend;
use crate::ranker::{PreparedRequest, Ranker, ScoreInput};

/// One request for the model thread.
#[derive(Debug)]
pub struct RankJob {
    /// The rendered, tokenized request.
    pub request: PreparedRequest,
    /// Cache key of its history part; none when the prompt cannot be split into cached parts.
    pub history_key: Option<u64>,
}

impl RankJob {
    /// Wraps a prepared request, computing its history key.
    pub fn new(request: PreparedRequest) -> Self {
        let p = &request.prompt;
        let history_key = p.splittable.then(|| history_key(p.history()));
        Self {
            request,
            history_key,
        }
    }

    /// Tokens the request runs at most: everything after the shared instruction prefix.
    pub fn max_tokens(&self) -> usize {
        let p = &self.request.prompt;
        p.ids.len() - p.prefix_len
    }
}

/// One request's scores.
#[derive(Debug, Clone)]
pub struct RankOutput {
    /// Raw letter logits, in candidate order.
    pub logits: Vec<f32>,
    /// Softmax of the logits over the candidates.
    pub probabilities: Vec<f32>,
    /// Prompt length, including cached tokens.
    pub prompt_tokens: usize,
    /// Tokens served from the prefix or history cache.
    pub cached_tokens: usize,
}

/// The ranker plus its history cache and compute threads, owned by the model thread.
pub struct RankerBackend {
    ranker: Arc<Ranker>,
    cache: HistoryCache<KvCache>,
    pool: rayon::ThreadPool,
}

impl RankerBackend {
    /// A backend computing on `threads` threads (0: rayon's default, one per core) and keeping
    /// up to `cache_bytes` of history state.
    pub fn new(
        ranker: Arc<Ranker>,
        threads: usize,
        cache_bytes: usize,
    ) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ranker-compute-{i}"))
            .build()?;
        Ok(Self {
            ranker,
            cache: HistoryCache::new(cache_bytes),
            pool,
        })
    }

    fn score(&mut self, jobs: Vec<RankJob>) -> crate::Result<Vec<RankOutput>> {
        let cached: Vec<Option<KvCache>> = jobs
            .iter()
            .map(|j| {
                j.history_key
                    .and_then(|key| self.cache.get(key, j.request.prompt.history()))
            })
            .collect();
        let hits = cached.iter().filter(|c| c.is_some()).count();
        metrics::counter!(m::CACHE_HITS_TOTAL).increment(hits as u64);
        metrics::counter!(m::CACHE_MISSES_TOTAL).increment(
            jobs.iter()
                .filter(|j| j.history_key.is_some())
                .count()
                .saturating_sub(hits) as u64,
        );
        let want_cache = self.cache_enabled();
        let inputs: Vec<ScoreInput> = jobs
            .iter()
            .zip(&cached)
            .map(|(j, c)| ScoreInput {
                request: &j.request,
                history_cache: c.as_ref(),
                want_history_cache: want_cache && c.is_none() && j.history_key.is_some(),
            })
            .collect();
        let ranker = self.ranker.clone();
        let scores = self.pool.install(|| ranker.score_batch(&inputs))?;
        metrics::histogram!(m::BATCH_TOKENS)
            .record(scores.iter().map(|s| s.tokens_run).sum::<usize>() as f64);
        let mut outputs = Vec::with_capacity(jobs.len());
        for (job, s) in jobs.iter().zip(scores) {
            let prompt_tokens = job.request.prompt.ids.len();
            if let (Some(key), Some(state)) = (job.history_key, s.history_cache) {
                let bytes = state.size_bytes();
                self.cache
                    .insert(key, job.request.prompt.history(), state, bytes);
            }
            outputs.push(RankOutput {
                logits: s.logits,
                probabilities: s.probabilities,
                prompt_tokens,
                cached_tokens: prompt_tokens - s.tokens_run,
            });
        }
        metrics::gauge!(m::CACHE_BYTES).set(self.cache.used_bytes() as f64);
        Ok(outputs)
    }

    fn cache_enabled(&self) -> bool {
        self.cache.capacity_bytes() > 0
    }
}

impl Backend for RankerBackend {
    type Job = RankJob;
    type Output = RankOutput;

    fn run(&mut self, jobs: Vec<RankJob>) -> Result<Vec<RankOutput>, String> {
        self.score(jobs).map_err(|e| e.to_string())
    }
}
