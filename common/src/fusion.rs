//! The two-stage fusion rule, in one place for the gateway (serving), the ranker's training
//! validation and `llamarec calibrate`.
//!
//! Each of the N candidates gets `(1 - w) * retriever_log_prob + w * ranker_log_prob`, both
//! log-softmax values over the same N candidates, so the weight trades two comparable quantities
//! (w = 1 is the paper: order by the LLM alone; w = 0 is the retriever's order). Candidates with
//! equal fused scores keep the retriever's order.

/// Log-softmax of `xs` (numerically stable).
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = xs.iter().map(|x| (x - max).exp()).sum();
    let log_sum = max + sum.ln();
    xs.iter().map(|x| x - log_sum).collect()
}

/// One candidate's fused score from its two log-probabilities.
pub fn fused_score(ranker_weight: f32, retriever_log_prob: f32, ranker_log_prob: f32) -> f32 {
    (1.0 - ranker_weight) * retriever_log_prob + ranker_weight * ranker_log_prob
}

/// 1-based position of candidate `target` after fusing raw retriever scores and raw ranker
/// logits (both in the retriever's order) at `ranker_weight`: what the gateway would answer.
pub fn fused_rank(retriever_scores: &[f32], ranker_logits: &[f32], ranker_weight: f32, target: usize) -> usize {
    assert_eq!(retriever_scores.len(), ranker_logits.len(), "one ranker logit per retrieved candidate");
    let r = log_softmax(retriever_scores);
    let l = log_softmax(ranker_logits);
    let fused: Vec<f32> = r.iter().zip(&l).map(|(&r, &l)| fused_score(ranker_weight, r, l)).collect();
    let t = fused[target];
    // A stable descending sort puts before the target every strictly better candidate and every
    // equal one the retriever placed earlier.
    1 + fused.iter().enumerate().filter(|&(i, &s)| s.total_cmp(&t).is_gt() || (s == t && i < target)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_is_normalised() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }

    #[test]
    fn weight_zero_is_the_retriever_order_and_weight_one_the_ranker_order() {
        let retriever = [9.0, 8.0, 7.0];
        let ranker = [-3.0, -0.1, -2.0];
        assert_eq!((0..3).map(|t| fused_rank(&retriever, &ranker, 0.0, t)).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((0..3).map(|t| fused_rank(&retriever, &ranker, 1.0, t)).collect::<Vec<_>>(), [3, 1, 2]);
    }

    #[test]
    fn fusion_weighs_normalised_scores_and_ties_keep_the_retriever_order() {
        // Retriever strongly prefers 0 (log-softmax gap ~10); the ranker mildly prefers 1 (gap 1).
        assert_eq!(fused_rank(&[10.0, 0.0], &[0.0, 1.0], 0.5, 1), 2);
        assert_eq!(fused_rank(&[10.0, 0.0], &[0.0, 1.0], 0.95, 1), 1);
        // Equal everywhere: the retriever's order decides.
        assert_eq!(fused_rank(&[1.0, 1.0], &[2.0, 2.0], 0.5, 0), 1);
        assert_eq!(fused_rank(&[1.0, 1.0], &[2.0, 2.0], 0.5, 1), 2);
    }
}
