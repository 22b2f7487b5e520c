//! The model side of the service: runs batches of prepared requests on the ranker each was
//! admitted with, starting each from its user's cached history state when there is one, and
//! caching the state of new histories.

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
    /// The ranker (base + adapter) served when the request was admitted: it computes the
    /// request even when a reload swaps another one in meanwhile.
    pub ranker: Arc<Ranker>,
    /// That ranker's generation ([`crate::reload::ServedModel::generation`]).
    pub generation: u64,
}

impl RankJob {
    /// Wraps a request prepared by `ranker` of `generation`, computing its history key.
    pub fn new(request: PreparedRequest, ranker: Arc<Ranker>, generation: u64) -> Self {
        let p = &request.prompt;
        let history_key = p.splittable.then(|| history_key(p.history()));
        Self {
            request,
            history_key,
            ranker,
            generation,
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

/// The history cache and compute threads, owned by the model thread.
pub struct RankerBackend {
    cache: HistoryCache<KvCache>,
    /// The ranker generation whose attention states `cache` holds.
    cache_generation: u64,
    cache_bytes: usize,
    pool: rayon::ThreadPool,
}

impl RankerBackend {
    /// A backend computing on `threads` threads (0: rayon's default, one per core) and keeping
    /// up to `cache_bytes` of history state.
    pub fn new(threads: usize, cache_bytes: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ranker-compute-{i}"))
            .build()?;
        Ok(Self {
            cache: HistoryCache::new(cache_bytes),
            cache_generation: 0,
            cache_bytes,
            pool,
        })
    }

    /// Runs a batch, each run of jobs admitted with the same ranker in one forward pass (a
    /// batch mixes rankers only around a reload).
    fn score(&mut self, jobs: Vec<RankJob>) -> crate::Result<Vec<RankOutput>> {
        let mut outputs = Vec::with_capacity(jobs.len());
        let mut rest = jobs;
        while !rest.is_empty() {
            let same = rest.iter().take_while(|j| Arc::ptr_eq(&j.ranker, &rest[0].ranker)).count();
            let tail = rest.split_off(same);
            outputs.extend(self.score_on_one_ranker(rest)?);
            rest = tail;
        }
        Ok(outputs)
    }

    /// Whether jobs of `generation` may use the history cache: yes once it holds that
    /// generation's states (emptied when the generation is newer), no for an older generation's
    /// last requests (their states would answer for another adapter) or a disabled cache.
    fn cache_usable_for(&mut self, generation: u64) -> bool {
        if generation > self.cache_generation {
            self.cache = HistoryCache::new(self.cache_bytes);
            self.cache_generation = generation;
        }
        generation == self.cache_generation && self.cache_bytes > 0
    }

    fn score_on_one_ranker(&mut self, jobs: Vec<RankJob>) -> crate::Result<Vec<RankOutput>> {
        let ranker = jobs[0].ranker.clone();
        let use_cache = self.cache_usable_for(jobs[0].generation);
        let cached: Vec<Option<KvCache>> = jobs
            .iter()
            .map(|j| {
                j.history_key
                    .filter(|_| use_cache)
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
        let inputs: Vec<ScoreInput> = jobs
            .iter()
            .zip(&cached)
            .map(|(j, c)| ScoreInput {
                request: &j.request,
                history_cache: c.as_ref(),
                want_history_cache: use_cache && c.is_none() && j.history_key.is_some(),
            })
            .collect();
        let scores = self.pool.install(|| ranker.score_batch(&inputs))?;
        metrics::histogram!(m::BATCH_TOKENS)
            .record(scores.iter().map(|s| s.tokens_run).sum::<usize>() as f64);
        let mut outputs = Vec::with_capacity(jobs.len());
        for (job, s) in jobs.iter().zip(scores) {
            let prompt_tokens = job.request.prompt.ids.len();
            if let (Some(key), Some(state)) = (job.history_key, s.history_cache) {
                let bytes = state.size_bytes();
                self.cache.insert(key, job.request.prompt.history(), state, bytes);
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
}

impl Backend for RankerBackend {
    type Job = RankJob;
    type Output = RankOutput;

    fn run(&mut self, jobs: Vec<RankJob>) -> Result<Vec<RankOutput>, String> {
        self.score(jobs).map_err(|e| e.to_string())
    }
}
