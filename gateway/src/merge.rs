//! Merging the two stages into the final list (the fusion rule itself: `llamarec_common::fusion`).
//!
//! The ranker re-orders the first N retrieved items. Each ranked item gets a fused score
//! `(1 - w) * retriever_log_prob + w * ranker_log_prob`, where both are log-softmax values over
//! the same N candidates, so the weight trades two comparable quantities (w = 1 is the paper:
//! order by the LLM alone). Items beyond N keep the retriever's order after all ranked items.

/// One retrieved item as the merge sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    /// External item id.
    pub item_id: String,
    /// Title.
    pub title: String,
    /// Raw retriever score.
    pub score: f32,
}

/// The ranker's answer for one candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Raw letter logit.
    pub logit: f32,
    /// Log-probability over the candidates.
    pub log_prob: f32,
}

/// One item of the final list.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// External item id.
    pub item_id: String,
    /// Title.
    pub title: String,
    /// Score of the item within its tier (ranked items first, then the rest).
    pub final_score: f32,
    /// Raw retriever score.
    pub retriever_score: f32,
    /// 1-based retriever position.
    pub retriever_rank: u32,
    /// The ranker's evidence, when ranked.
    pub ranked: Option<Ranked>,
}

pub use llamarec_common::fusion::log_softmax;
use llamarec_common::fusion::fused_score;

/// Merges the retriever's list with the ranker's scores of its first `ranked.len()` items and
/// returns the best `k`. With `ranked` empty this is the retriever's order.
pub fn merge(retrieved: &[Retrieved], ranked: &[Ranked], ranker_weight: f32, k: usize) -> Vec<Merged> {
    let n = ranked.len().min(retrieved.len());
    let retriever_lp = log_softmax(&retrieved[..n].iter().map(|r| r.score).collect::<Vec<_>>());
    let mut head: Vec<Merged> = retrieved[..n]
        .iter()
        .zip(ranked)
        .zip(retriever_lp)
        .enumerate()
        .map(|(i, ((r, s), r_lp))| Merged {
            item_id: r.item_id.clone(),
            title: r.title.clone(),
            final_score: fused_score(ranker_weight, r_lp, s.log_prob),
            retriever_score: r.score,
            retriever_rank: i as u32 + 1,
            ranked: Some(*s),
        })
        .collect();
    // Stable sort: equal fused scores keep the retriever's order.
    head.sort_by(|a, b| b.final_score.total_cmp(&a.final_score));
    let tail_lp = log_softmax(&retrieved[n..].iter().map(|r| r.score).collect::<Vec<_>>());
    let tail = retrieved[n..].iter().zip(tail_lp).enumerate().map(|(i, (r, lp))| Merged {
        item_id: r.item_id.clone(),
        title: r.title.clone(),
        final_score: lp,
        retriever_score: r.score,
        retriever_rank: (n + i) as u32 + 1,
        ranked: None,
    });
    head.into_iter().chain(tail).take(k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(scores: &[f32]) -> Vec<Retrieved> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &s)| Retrieved { item_id: format!("i{i}"), title: format!("T{i}"), score: s })
            .collect()
    }

    fn ranked(log_probs: &[f32]) -> Vec<Ranked> {
        log_probs.iter().map(|&l| Ranked { logit: l * 2.0, log_prob: l }).collect()
    }

    fn ids(m: &[Merged]) -> Vec<&str> {
        m.iter().map(|x| x.item_id.as_str()).collect()
    }

    #[test]
    fn weight_one_orders_by_the_ranker_alone() {
        let r = items(&[9.0, 8.0, 7.0]);
        let m = merge(&r, &ranked(&[-3.0, -0.1, -2.0]), 1.0, 3);
        assert_eq!(ids(&m), ["i1", "i2", "i0"]);
        assert_eq!(m[0].retriever_rank, 2);
        assert_eq!(m[0].final_score, -0.1);
    }

    #[test]
    fn weight_zero_keeps_the_retriever_order() {
        let r = items(&[9.0, 8.0, 7.0]);
        let m = merge(&r, &ranked(&[-3.0, -0.1, -2.0]), 0.0, 3);
        assert_eq!(ids(&m), ["i0", "i1", "i2"]);
    }

    #[test]
    fn fusion_weighs_normalised_scores() {
        // Retriever strongly prefers i0 (log-softmax gap ~10); ranker mildly prefers i1 (gap 1).
        let r = items(&[10.0, 0.0]);
        let rk = ranked(&[-1.3133, -0.3133]);
        assert_eq!(ids(&merge(&r, &rk, 0.5, 2)), ["i0", "i1"]);
        assert_eq!(ids(&merge(&r, &rk, 0.95, 2)), ["i1", "i0"]);
    }

    #[test]
    fn items_beyond_n_follow_in_retriever_order_and_k_truncates() {
        let r = items(&[9.0, 8.0, 7.0, 6.0, 5.0]);
        let m = merge(&r, &ranked(&[-2.0, -1.0]), 1.0, 4);
        assert_eq!(ids(&m), ["i1", "i0", "i2", "i3"]);
        assert!(m[2].ranked.is_none());
        assert_eq!(m[3].retriever_rank, 4);
    }

    #[test]
    fn no_ranker_scores_is_the_retriever_order() {
        let r = items(&[3.0, 2.0, 1.0]);
        let m = merge(&r, &[], 1.0, 2);
        assert_eq!(ids(&m), ["i0", "i1"]);
        assert!(m.iter().all(|x| x.ranked.is_none()));
    }
}
