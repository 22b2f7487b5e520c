//! Training examples: windows over users' training sequences and left-padded batches of them.

use candle_core::{Device, Tensor};

/// A training window: consecutive items of one user's training sequence, of which the last
/// `predicted` are targets (each predicted from the window's items before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainWindow<'a> {
    /// At most `max_len + 1` items, oldest first.
    pub items: &'a [u32],
    /// How many of the window's (input, next item) pairs, counted from its end, are trained.
    pub predicted: usize,
}

impl<'a> TrainWindow<'a> {
    fn whole(items: &'a [u32]) -> Self {
        Self { items, predicted: items.len().saturating_sub(1) }
    }

    /// Items in the window.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the window holds no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// How training sequences are cut into windows of at most `max_len + 1` items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windowing {
    /// The reference code's sliding windows, every pair of each window trained: a sequence that
    /// fits (with less than `step` items to spare) becomes one window of its last `max_len + 1`
    /// items; a longer one is covered by windows ending at its last item and then every `step`
    /// items earlier. Items before the earliest window are not trained, and a target's history
    /// is only what precedes it in its window (on average half of `max_len`).
    Sliding {
        /// Items between consecutive window ends.
        step: usize,
    },
    /// Every training item is a target exactly once: the first window is the sequence's first
    /// `max_len + 1` items with all its pairs; then windows end every `step` items (and at the
    /// last item), each predicting only the items no earlier window predicted. Every target past
    /// the first `max_len` then sees at least `max_len + 1 − step` events of history, as serving
    /// a long history does; `step` 1 is RecBole's training on every prefix (truncated to
    /// `max_len`). Costs about `max_len / step` times the encoder work of `Sliding`.
    EachTargetOnce {
        /// Items between consecutive window ends.
        step: usize,
    },
}

/// Cuts training sequences into windows (see [`Windowing`]). Sequences of fewer than two items
/// give no pair and are skipped.
pub fn training_windows<'a>(sequences: &[&'a [u32]], max_len: usize, windowing: Windowing) -> Vec<TrainWindow<'a>> {
    let width = max_len + 1;
    let mut windows = Vec::new();
    for &seq in sequences {
        let n = seq.len();
        if n < 2 {
            continue;
        }
        match windowing {
            Windowing::Sliding { step } => {
                let step = step.max(1);
                if n < width + step {
                    windows.push(TrainWindow::whole(&seq[n.saturating_sub(width)..]));
                } else {
                    let mut end = n;
                    while end >= width {
                        windows.push(TrainWindow::whole(&seq[end - width..end]));
                        end -= step;
                    }
                }
            }
            Windowing::EachTargetOnce { step } => {
                let step = step.max(1);
                let mut end = n.min(width);
                windows.push(TrainWindow::whole(&seq[..end]));
                while end < n {
                    let next = (end + step).min(n);
                    windows.push(TrainWindow { items: &seq[next - width..next], predicted: next - end });
                    end = next;
                }
            }
        }
    }
    windows
}

/// Windows per pool when grouping by length: batches are cut from pools of
/// `LENGTH_POOL_BATCHES` batches' worth of shuffled windows.
const LENGTH_POOL_BATCHES: usize = 32;

/// Splits a shuffled window order into batches of similar lengths, in random batch order.
///
/// A batch is padded to its longest window, so random batches from ML-100K (many histories
/// over 200 items, many under 50) would be more than half padding. Sorting within pools of a
/// few dozen batches keeps batches nearly padding-free while their composition and order still
/// change every epoch.
pub fn length_grouped_batches(order: &[usize], windows: &[TrainWindow<'_>], batch_size: usize, rng: &mut impl rand::Rng) -> Vec<Vec<usize>> {
    use rand::seq::SliceRandom;
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(batch_size));
    for pool in order.chunks(batch_size * LENGTH_POOL_BATCHES) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| windows[i].len());
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// One training batch.
#[derive(Debug)]
pub struct Batch {
    /// (batch, length) u32 input items, left-padded with 0.
    pub tokens: Tensor,
    /// (N) u32 flat positions (row · length + column) that have a target.
    pub positions: Tensor,
    /// (N) u32 next item at each of those positions.
    pub targets: Tensor,
    /// N, the number of predictions in the batch.
    pub num_targets: usize,
}

impl Batch {
    /// Builds a batch from windows: inputs are all items but the last, targets the window's
    /// last `predicted` items. The batch is as long as its longest window, padded on the left so
    /// that every row ends at the same column (the recurrence then sees padding only before the
    /// first event).
    ///
    /// With `first_item_target`, a window no longer than `max_len` (so a whole training sequence)
    /// also predicts its first item from the empty history at the padding column before it, as
    /// the reference code's label alignment does.
    pub fn new(windows: &[TrainWindow<'_>], max_len: usize, first_item_target: bool, device: &Device) -> candle_core::Result<Self> {
        let predicts_first = |w: &TrainWindow<'_>| predicts_first(w, max_len, first_item_target);
        let len = windows
            .iter()
            .map(|w| w.len().saturating_sub(1) + usize::from(predicts_first(w)))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tokens = vec![0u32; windows.len() * len];
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (row, window) in windows.iter().enumerate() {
            let items = window.items;
            let pairs = items.len().saturating_sub(1);
            let offset = row * len + len - pairs;
            if predicts_first(window) {
                positions.push((offset - 1) as u32);
                targets.push(items[0]);
            }
            tokens[offset..offset + pairs].copy_from_slice(&items[..pairs]);
            for t in pairs - window.predicted.min(pairs)..pairs {
                positions.push((offset + t) as u32);
                targets.push(items[t + 1]);
            }
        }
        let num_targets = targets.len();
        Ok(Self {
            tokens: Tensor::from_vec(tokens, (windows.len(), len), device)?,
            positions: Tensor::from_vec(positions, num_targets, device)?,
            targets: Tensor::from_vec(targets, num_targets, device)?,
            num_targets,
        })
    }

    /// Targets a window contributes (see [`Batch::new`]).
    pub fn targets_of(window: &TrainWindow<'_>, max_len: usize, first_item_target: bool) -> usize {
        window.predicted.min(window.len().saturating_sub(1)) + usize::from(predicts_first(window, max_len, first_item_target))
    }
}

/// Whether `window` also predicts its first item from the empty history: only a whole training
/// sequence (no longer than `max_len`) does, and only with `first_item_target`.
fn predicts_first(window: &TrainWindow<'_>, max_len: usize, first_item_target: bool) -> bool {
    first_item_target && !window.is_empty() && window.len() <= max_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sequences_keep_their_tail_and_long_ones_slide_from_the_end() {
        let short: Vec<u32> = (1..=5).collect();
        let long: Vec<u32> = (1..=12).collect();
        let single = [9u32];
        let windows = training_windows(&[&short, &long, &single], 3, Windowing::Sliding { step: 4 });
        let items: Vec<&[u32]> = windows.iter().map(|w| w.items).collect();
        // max_len 3 -> windows of 4 items; 5 < 4 + 4 so the short one is its last 4 items.
        assert_eq!(items[0], &[2, 3, 4, 5]);
        // 12 >= 8: windows end at 12, 8 and 4.
        assert_eq!(items[1], &[9, 10, 11, 12]);
        assert_eq!(items[2], &[5, 6, 7, 8]);
        assert_eq!(items[3], &[1, 2, 3, 4]);
        assert_eq!(items.len(), 4, "a one-item sequence gives no pair");
        assert!(windows.iter().all(|w| w.predicted == 3), "every pair of a sliding window is trained");
    }

    /// The targets (item, history length) an epoch of `windows` trains, in window order.
    fn trained(windows: &[TrainWindow<'_>]) -> Vec<(u32, usize)> {
        let mut out = Vec::new();
        for w in windows {
            let pairs = w.len() - 1;
            for t in pairs - w.predicted..pairs {
                out.push((w.items[t + 1], t + 1));
            }
        }
        out
    }

    #[test]
    fn each_target_once_trains_every_item_after_the_first_once_with_a_full_history_past_max_len() {
        let long: Vec<u32> = (1..=12).collect();
        let short: Vec<u32> = (20..=22).collect();
        // max_len 3, step 2: [1..4] all pairs, then ends at 6, 8, 10, 12 with 2 new targets each.
        let windows = training_windows(&[&long, &short], 3, Windowing::EachTargetOnce { step: 2 });
        let items: Vec<&[u32]> = windows.iter().map(|w| w.items).collect();
        assert_eq!(items, vec![&[1, 2, 3, 4][..], &[3, 4, 5, 6], &[5, 6, 7, 8], &[7, 8, 9, 10], &[9, 10, 11, 12], &[20, 21, 22]]);
        let targets = trained(&windows);
        let long_targets: Vec<u32> = targets.iter().take(11).map(|&(item, _)| item).collect();
        assert_eq!(long_targets, (2..=12).collect::<Vec<_>>(), "each item but the first exactly once, in order");
        assert!(targets[3..11].iter().all(|&(_, history)| history >= 2), "max_len + 1 - step events of history: {targets:?}");
        assert_eq!(&targets[11..], &[(21, 1), (22, 2)]);
        // Step 1 is every prefix: each target past max_len sees exactly max_len events.
        let prefixes = training_windows(&[&long], 3, Windowing::EachTargetOnce { step: 1 });
        assert_eq!(prefixes.len(), 1 + 8);
        assert!(trained(&prefixes)[3..].iter().all(|&(_, history)| history == 3));
        // A step that does not divide the rest ends the last window at the last item.
        let uneven = training_windows(&[&long], 3, Windowing::EachTargetOnce { step: 5 });
        assert_eq!(uneven.iter().map(|w| (w.items[w.len() - 1], w.predicted)).collect::<Vec<_>>(), vec![(4, 3), (9, 5), (12, 3)]);
    }

    #[test]
    fn length_grouping_covers_every_window_once_in_full_batches() {
        use rand::SeedableRng;
        let seqs: Vec<Vec<u32>> = (0..100).map(|i| vec![1; 2 + (i * 37) % 50]).collect();
        let windows: Vec<TrainWindow<'_>> = seqs.iter().map(|s| TrainWindow::whole(s)).collect();
        let order: Vec<usize> = (0..100).rev().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let batches = length_grouped_batches(&order, &windows, 16, &mut rng);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(batches.iter().filter(|b| b.len() < 16).count(), 1, "only the pool's tail is short");
        let padding: usize = batches
            .iter()
            .map(|b| {
                let longest = b.iter().map(|&i| windows[i].len()).max().unwrap();
                b.iter().map(|&i| longest - windows[i].len()).sum::<usize>()
            })
            .sum();
        assert!(padding < 100 * 4, "batches of similar lengths: {padding} padded positions");
    }

    #[test]
    fn batch_left_pads_and_lists_only_real_targets() {
        let batch = Batch::new(&[TrainWindow::whole(&[1, 2, 3, 4]), TrainWindow::whole(&[7, 8])], 200, false, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![0, 0, 7]]);
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 4, 8]);
        assert_eq!(batch.num_targets, 4);
    }

    #[test]
    fn whole_sequences_also_predict_their_first_item_from_empty_history() {
        // max_len 3: [1, 2, 3, 4] is a cut window (4 items), [7, 8] a whole sequence.
        let batch = Batch::new(&[TrainWindow::whole(&[1, 2, 3, 4]), TrainWindow::whole(&[7, 8])], 3, true, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![0, 0, 7]]);
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 4, 5]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 4, 7, 8]);
        let whole = Batch::new(&[TrainWindow::whole(&[5, 6, 7])], 3, true, &Device::Cpu).unwrap();
        assert_eq!(whole.tokens.to_vec2::<u32>().unwrap(), vec![vec![0, 5, 6]]);
        assert_eq!(whole.targets.to_vec1::<u32>().unwrap(), vec![5, 6, 7]);
    }

    #[test]
    fn a_window_of_new_targets_predicts_only_its_last_pairs_from_its_whole_input() {
        let window = TrainWindow { items: &[1, 2, 3, 4, 5], predicted: 2 };
        let batch = Batch::new(&[window, TrainWindow::whole(&[7, 8])], 4, true, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3, 4], vec![0, 0, 0, 7]]);
        // Row 0 predicts 4 and 5 from columns 2 and 3; row 1 (a whole sequence) 7 and 8.
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![2, 3, 6, 7]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![4, 5, 7, 8]);
        assert_eq!(Batch::targets_of(&window, 4, true), 2);
    }
}
