//! Ranking metrics with one ground-truth item per user, as in the LlamaRec evaluation:
//! Recall@K (= hit@K), NDCG@K = 1/log2(rank+1) and MRR@K = 1/rank when rank <= K, else 0.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The cut-offs reported everywhere.
pub const DEFAULT_KS: [usize; 4] = [1, 5, 10, 20];

/// One user's NDCG@k: 1/log2(rank+1) for a 1-based `rank` within `k`, else 0 (None = not ranked).
pub fn ndcg_at(rank: Option<usize>, k: usize) -> f64 {
    match rank {
        Some(r) if r <= k => 1.0 / ((r + 1) as f64).log2(),
        _ => 0.0,
    }
}

/// 1-based rank of `target` in a full ranking of `scores` (index = item), ignoring `masked`
/// items (the user's history) and index 0 (padding).
///
/// Ties count against the target: an item scoring exactly as much as the target ranks ahead of
/// it, so a model that scores everything equally cannot look good.
pub fn rank_of_target(scores: &[f32], target: u32, masked: &[u32]) -> usize {
    let t = target as usize;
    let target_score = scores[t];
    let mut is_masked = vec![false; scores.len()];
    if let Some(first) = is_masked.first_mut() {
        *first = true;
    }
    for &m in masked {
        if let Some(slot) = is_masked.get_mut(m as usize) {
            *slot = true;
        }
    }
    is_masked[t] = false;
    1 + scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| i != t && !is_masked[i] && (s >= target_score || s.is_nan()))
        .count()
}

/// Metric values at one cut-off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AtK {
    /// Fraction of users whose target is in the top K.
    pub recall: f64,
    /// Mean 1/log2(rank+1) over users, 0 beyond K.
    pub ndcg: f64,
    /// Mean 1/rank over users, 0 beyond K.
    pub mrr: f64,
}

/// Metrics over a set of users: the JSON layout every `llamarec eval` writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricReport {
    /// Number of users evaluated.
    pub users: usize,
    /// Metrics keyed by K.
    pub at: BTreeMap<usize, AtK>,
}

impl MetricReport {
    /// The metrics at `k`, or zeros when `k` was not accumulated.
    pub fn get(&self, k: usize) -> AtK {
        self.at.get(&k).copied().unwrap_or_default()
    }
}

/// Sums per-user contributions; `None` marks a user whose target was not ranked at all (e.g. not
/// among the retriever's candidates in two-stage evaluation), a miss at every K.
#[derive(Debug, Clone)]
pub struct MetricAccumulator {
    ks: Vec<usize>,
    sums: Vec<AtK>,
    users: usize,
}

impl Default for MetricAccumulator {
    fn default() -> Self {
        Self::new(&DEFAULT_KS)
    }
}

impl MetricAccumulator {
    /// An empty accumulator for the given cut-offs.
    pub fn new(ks: &[usize]) -> Self {
        Self { ks: ks.to_vec(), sums: vec![AtK::default(); ks.len()], users: 0 }
    }

    /// Adds one user whose target has 1-based `rank` (None = not ranked).
    pub fn add(&mut self, rank: Option<usize>) {
        self.users += 1;
        let Some(rank) = rank else { return };
        debug_assert!(rank >= 1, "ranks are 1-based");
        for (k, sum) in self.ks.iter().zip(&mut self.sums) {
            if rank <= *k {
                sum.recall += 1.0;
                sum.ndcg += ndcg_at(Some(rank), *k);
                sum.mrr += 1.0 / rank as f64;
            }
        }
    }

    /// Merges another accumulator with the same cut-offs (for parallel evaluation).
    pub fn merge(&mut self, other: &MetricAccumulator) {
        assert_eq!(self.ks, other.ks, "cannot merge metrics over different cut-offs");
        self.users += other.users;
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            a.recall += b.recall;
            a.ndcg += b.ndcg;
            a.mrr += b.mrr;
        }
    }

    /// Number of users added so far.
    pub fn users(&self) -> usize {
        self.users
    }

    /// Means over the users added.
    pub fn report(&self) -> MetricReport {
        let n = self.users.max(1) as f64;
        MetricReport {
            users: self.users,
            at: self
                .ks
                .iter()
                .zip(&self.sums)
                .map(|(&k, s)| (k, AtK { recall: s.recall / n, ndcg: s.ndcg / n, mrr: s.mrr / n }))
                .collect(),
        }
    }
}

/// Two-stage evaluation reports both views the paper uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwoStageReport {
    /// Over all test users; users whose target is not among the candidates are misses.
    pub all_users: MetricReport,
    /// Over the "valid subset": users whose target is among the candidates.
    pub valid_subset: MetricReport,
}

/// Accumulates both two-stage views at once.
#[derive(Debug, Clone, Default)]
pub struct TwoStageAccumulator {
    /// All users.
    pub all_users: MetricAccumulator,
    /// Users whose target was among the candidates.
    pub valid_subset: MetricAccumulator,
}

impl TwoStageAccumulator {
    /// Adds one user: `rank` is the target's 1-based position after ranking the candidates, or
    /// None when the target was not a candidate.
    pub fn add(&mut self, rank: Option<usize>) {
        self.all_users.add(rank);
        if rank.is_some() {
            self.valid_subset.add(rank);
        }
    }

    /// Means of both views.
    pub fn report(&self) -> TwoStageReport {
        TwoStageReport { all_users: self.all_users.report(), valid_subset: self.valid_subset.report() }
    }
}

/// What every `llamarec eval` writes as JSON, whichever stage and however it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// "retriever" or "two-stage".
    pub stage: String,
    /// The split evaluated.
    pub split: crate::data::Split,
    /// Data set name.
    pub dataset: String,
    /// How it ran: "in-process" or "gateway <addr>".
    pub via: String,
    /// Candidates per user ranked by the LLM (two-stage only).
    pub candidates: Option<usize>,
    /// Over all evaluated users.
    pub all_users: MetricReport,
    /// Over the users whose target was among the candidates (two-stage only).
    pub valid_subset: Option<MetricReport>,
    /// Wall time of the evaluation.
    pub wall_seconds: f64,
}

/// Formats a report as a table with one row per K (what `llamarec eval` prints).
pub fn format_table(title: &str, report: &MetricReport) -> String {
    let mut out = format!("{title} ({} users)\n{:>6} {:>8} {:>8} {:>8}\n", report.users, "K", "Recall", "NDCG", "MRR");
    for (k, m) in &report.at {
        out.push_str(&format!("{:>6} {:>8.4} {:>8.4} {:>8.4}\n", k, m.recall, m.ndcg, m.mrr));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close_enough(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn rank_counts_higher_scores_and_skips_padding_and_history() {
        // index:          0    1    2    3    4    5
        let scores = [99.0, 0.5, 0.9, 0.7, 0.8, 0.1];
        assert_eq!(rank_of_target(&scores, 3, &[]), 3, "items 2 and 4 score higher; padding 0 ignored");
        assert_eq!(rank_of_target(&scores, 3, &[2]), 2, "history item 2 is masked");
        assert_eq!(rank_of_target(&scores, 3, &[3]), 3, "the target itself is never masked");
    }

    #[test]
    fn ties_rank_against_the_target() {
        let scores = [0.0, 1.0, 1.0, 1.0];
        assert_eq!(rank_of_target(&scores, 1, &[]), 3);
    }

    #[test]
    fn hand_computed_metrics() {
        let mut acc = MetricAccumulator::new(&[1, 5, 10]);
        acc.add(Some(1)); // recall 1,1,1; ndcg 1; mrr 1
        acc.add(Some(3)); // @1: 0; @5,@10: recall 1, ndcg 1/log2(4)=0.5, mrr 1/3
        acc.add(Some(7)); // @10 only: ndcg 1/log2(8)=1/3, mrr 1/7
        acc.add(None); // miss everywhere
        let r = acc.report();
        assert_eq!(r.users, 4);
        let at1 = r.get(1);
        assert!(close(at1.recall, 0.25) && close(at1.ndcg, 0.25) && close(at1.mrr, 0.25));
        let at5 = r.get(5);
        assert!(close(at5.recall, 0.5));
        assert!(close(at5.ndcg, (1.0 + 0.5) / 4.0), "NDCG uses log2(rank+1): {}", at5.ndcg);
        assert!(close(at5.mrr, (1.0 + 1.0 / 3.0) / 4.0));
        let at10 = r.get(10);
        assert!(close(at10.recall, 0.75));
        assert!(close(at10.ndcg, (1.0 + 0.5 + 1.0 / 3.0) / 4.0));
        assert!(close(at10.mrr, (1.0 + 1.0 / 3.0 + 1.0 / 7.0) / 4.0));
    }

    #[test]
    fn rank_exactly_k_counts_and_k_plus_one_does_not() {
        let mut acc = MetricAccumulator::new(&[5]);
        acc.add(Some(5));
        acc.add(Some(6));
        let at5 = acc.report().get(5);
        assert!(close(at5.recall, 0.5));
        assert!(close(at5.ndcg, 0.5 / 6f64.log2()));
        assert!(close(at5.mrr, 0.5 / 5.0));
    }

    #[test]
    fn two_stage_valid_subset_excludes_users_without_their_target() {
        let mut acc = TwoStageAccumulator::default();
        acc.add(Some(2));
        acc.add(None);
        acc.add(None);
        acc.add(Some(1));
        let r = acc.report();
        assert_eq!(r.all_users.users, 4);
        assert_eq!(r.valid_subset.users, 2);
        assert!(close(r.all_users.get(1).recall, 0.25));
        assert!(close(r.valid_subset.get(1).recall, 0.5));
        assert!(close(r.valid_subset.get(5).ndcg, (1.0 / 3f64.log2() + 1.0) / 2.0));
    }

    #[test]
    fn merge_equals_sequential() {
        let mut a = MetricAccumulator::default();
        let mut b = MetricAccumulator::default();
        let mut all = MetricAccumulator::default();
        for (i, r) in [Some(1), Some(4), None, Some(12), Some(30)].into_iter().enumerate() {
            if i % 2 == 0 { a.add(r) } else { b.add(r) }
            all.add(r);
        }
        a.merge(&b);
        let (merged, sequential) = (a.report(), all.report());
        assert_eq!(merged.users, sequential.users);
        for k in DEFAULT_KS {
            let (x, y) = (merged.get(k), sequential.get(k));
            assert!(close_enough(x.recall, y.recall) && close_enough(x.ndcg, y.ndcg) && close_enough(x.mrr, y.mrr), "@{k}: {x:?} vs {y:?}");
        }
    }
}
