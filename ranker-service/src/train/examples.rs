//! Training examples as LlamaRec builds them: a prefix of a user's training sequence, the item
//! that follows it (ground truth) plus negatives, shuffled so that the answer letter is uniform
//! over positions (position bias cannot be learned), labelled with the ground truth's letter.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// Where the negatives of a training example come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeKind {
    /// Uniform over the catalog minus the prefix and the ground truth (the paper).
    Random,
    /// The retriever's top items for the prefix (what the ranker sees at serving time).
    Retriever,
    /// `retriever_share` of the negatives from the retriever, the rest uniform.
    Mixed,
}

/// One (user, position) of the training sequences: the prefix `seq[..position]` predicts
/// `seq[position]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixRef {
    /// Index of the user's sequence.
    pub user: u32,
    /// Length of the prefix (>= 1).
    pub position: u32,
}

/// Every prefix of length >= `min_history` of every sequence, shuffled with `seed`: one epoch
/// of LlamaRec's training examples in random order.
pub fn epoch_order(sequences: &[&[u32]], min_history: usize, seed: u64) -> Vec<PrefixRef> {
    let mut out = Vec::new();
    for (u, s) in sequences.iter().enumerate() {
        for pos in min_history.max(1)..s.len() {
            out.push(PrefixRef {
                user: u as u32,
                position: pos as u32,
            });
        }
    }
    Rng::derived(seed, 1).shuffle(&mut out);
    out
}

/// A training example: candidates in prompt order and the ground truth's index among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The prefix (dense item ids, oldest first).
    pub history: Vec<u32>,
    /// Candidates in prompt (letter) order.
    pub candidates: Vec<u32>,
    /// Index of the ground truth in `candidates`.
    pub label: usize,
}

/// Builds the example of `prefix`: ground truth plus `num_candidates - 1` negatives that are
/// neither in the prefix nor the ground truth, drawn as `kind` says (`hard` lists the
/// retriever's top items for the prefix, best first; unused for `Random`), shuffled.
#[allow(clippy::too_many_arguments)]
pub fn build_example(
    sequence: &[u32],
    prefix: PrefixRef,
    num_items: usize,
    num_candidates: usize,
    kind: NegativeKind,
    retriever_share: f64,
    hard: &[u32],
    rng: &mut Rng,
) -> Example {
    let pos = prefix.position as usize;
    let history = sequence[..pos].to_vec();
    let target = sequence[pos];
    let mut excluded: HashSet<u32> = history.iter().copied().collect();
    excluded.insert(target);
    let wanted = num_candidates - 1;
    let from_retriever = match kind {
        NegativeKind::Random => 0,
        NegativeKind::Retriever => wanted,
        NegativeKind::Mixed => ((wanted as f64) * retriever_share).round() as usize,
    };
    let mut negatives = Vec::with_capacity(wanted);
    for &item in hard {
        if negatives.len() >= from_retriever {
            break;
        }
        if excluded.insert(item) {
            negatives.push(item);
        }
    }
    // Uniform negatives fill the rest (also when the retriever gave too few).
    while negatives.len() < wanted && excluded.len() < num_items {
        let item = 1 + rng.below(num_items) as u32;
        if excluded.insert(item) {
            negatives.push(item);
        }
    }
    let mut candidates = negatives;
    candidates.push(target);
    rng.shuffle(&mut candidates);
    let label = candidates
        .iter()
        .position(|&c| c == target)
        .expect("target is a candidate");
    Example {
        history,
        candidates,
        label,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_covers_every_prefix_once() {
        let a = [1u32, 2, 3, 4];
        let b = [5u32, 6];
        let order = epoch_order(&[&a, &b], 1, 3);
        assert_eq!(order.len(), 3 + 1);
        let mut seen: Vec<(u32, u32)> = order.iter().map(|p| (p.user, p.position)).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![(0, 1), (0, 2), (0, 3), (1, 1)]);
        assert_eq!(
            order,
            epoch_order(&[&a, &b], 1, 3),
            "deterministic per seed"
        );
    }

    #[test]
    fn negatives_avoid_history_and_target_and_labels_are_uniform() {
        let seq: Vec<u32> = (1..=30).collect();
        let prefix = PrefixRef {
            user: 0,
            position: 10,
        };
        let hard: Vec<u32> = vec![3, 11, 40, 41, 42, 43, 44];
        let mut rng = Rng::new(1);
        let mut label_counts = [0usize; 20];
        for _ in 0..2000 {
            let ex = build_example(
                &seq,
                prefix,
                200,
                20,
                NegativeKind::Random,
                0.0,
                &hard,
                &mut rng,
            );
            assert_eq!(ex.candidates.len(), 20);
            assert_eq!(ex.candidates[ex.label], 11);
            let set: HashSet<u32> = ex.candidates.iter().copied().collect();
            assert_eq!(set.len(), 20, "distinct candidates");
            assert!(ex
                .candidates
                .iter()
                .all(|c| *c == 11 || !(1..=10).contains(c)));
            assert!(ex.candidates.iter().all(|c| (1..=200).contains(c)));
            label_counts[ex.label] += 1;
        }
        assert!(
            label_counts.iter().all(|&c| (50..150).contains(&c)),
            "{label_counts:?}"
        );

        // Retriever negatives: the hard list minus the prefix (3) and the target (11), in full,
        // topped up with uniform ones.
        let ex = build_example(
            &seq,
            prefix,
            200,
            20,
            NegativeKind::Retriever,
            0.0,
            &hard,
            &mut rng,
        );
        for h in [40, 41, 42, 43, 44] {
            assert!(ex.candidates.contains(&h));
        }
        assert!(!ex.candidates.contains(&3));
        let ex = build_example(
            &seq,
            prefix,
            200,
            20,
            NegativeKind::Mixed,
            2.0 / 19.0,
            &hard,
            &mut rng,
        );
        assert!(ex.candidates.contains(&40) && ex.candidates.contains(&41));
        assert_eq!(ex.candidates.len(), 20);
    }
}
