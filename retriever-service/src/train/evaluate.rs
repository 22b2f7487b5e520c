//! Full-ranking evaluation of the retriever: every item scored, the user's history masked, the
//! target's rank turned into Recall/NDCG/MRR at 1, 5, 10, 20, 50, 100 by the shared metrics.

use crate::encoder::Encoder;
use crate::error::Result;
use llamarec_common::data::{Dataset, Split};
use llamarec_common::ranking_metrics::{rank_of_target, MetricAccumulator, MetricReport};

/// One user's evaluation input.
#[derive(Debug, Clone, Copy)]
pub struct EvalCase<'a> {
    /// History the model reads, oldest first (the last `max_len` events are used).
    pub history: &'a [u32],
    /// The held-out item.
    pub target: u32,
}

/// The cases of a data set split, one per user.
pub fn split_cases(dataset: &Dataset, split: Split) -> Vec<EvalCase<'_>> {
    dataset.eval_examples(split).map(|e| EvalCase { history: e.history, target: e.target }).collect()
}

/// 1-based rank of each case's target among all items, history masked, through the serving
/// encoder (so the figures describe what the service returns).
pub fn ranks(encoder: &Encoder, cases: &[EvalCase<'_>], threads: usize) -> Result<Vec<usize>> {
    let max_len = encoder.config().max_len;
    let rank_one = |case: &EvalCase<'_>| -> Result<usize> {
        let recent = &case.history[case.history.len().saturating_sub(max_len)..];
        let state = encoder.encode(recent)?;
        Ok(rank_of_target(&encoder.all_scores(&state), case.target, case.history))
    };
    let threads = threads.clamp(1, cases.len().max(1));
    let chunk = cases.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            cases.chunks(chunk).map(|part| scope.spawn(move || part.iter().map(rank_one).collect::<Result<Vec<_>>>())).collect();
        let mut all = Vec::with_capacity(cases.len());
        for h in handles {
            all.extend(h.join().expect("evaluation thread panicked")?);
        }
        Ok(all)
    })
}

/// Cut-offs of the retriever's reports: the paper's 1/5/10/20, and 50/100 for candidate lists
/// longer than the ranker's 20.
pub const RETRIEVER_KS: [usize; 6] = [1, 5, 10, 20, 50, 100];

/// Metrics over `cases` (see [`ranks`]) at [`RETRIEVER_KS`].
pub fn evaluate(encoder: &Encoder, cases: &[EvalCase<'_>], threads: usize) -> Result<MetricReport> {
    let mut acc = MetricAccumulator::new(&RETRIEVER_KS);
    for rank in ranks(encoder, cases, threads)? {
        acc.add(Some(rank));
    }
    Ok(acc.report())
}
