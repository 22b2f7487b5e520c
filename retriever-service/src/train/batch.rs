//! Training examples: windows over users' training sequences and left-padded batches of them.

use candle_core::{Device, Tensor};

/// Cuts training sequences into windows of at most `max_len + 1` items, so that each window
/// gives up to `max_len` (input, next item) pairs.
///
/// A sequence that fits (with less than `step` items to spare) becomes one window of its last
/// `max_len + 1` items; a longer one is covered by windows ending at its last item and then
/// every `step` items earlier, as the reference code's sliding windows do, so that the long
/// histories of heavy users are not cut to their tail. Sequences of fewer than two items give no
/// pair and are skipped.
pub fn training_windows<'a>(sequences: &[&'a [u32]], max_len: usize, step: usize) -> Vec<&'a [u32]> {
    let width = max_len + 1;
    let step = step.max(1);
    let mut windows = Vec::new();
    for &seq in sequences {
        let n = seq.len();
        if n < 2 {
            continue;
        }
        if n < width + step {
            windows.push(&seq[n.saturating_sub(width)..]);
        } else {
            let mut end = n;
            while end >= width {
                windows.push(&seq[end - width..end]);
                end -= step;
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
pub fn length_grouped_batches(order: &[usize], windows: &[&[u32]], batch_size: usize, rng: &mut impl rand::Rng) -> Vec<Vec<usize>> {
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
    /// Builds a batch from windows: inputs are all items but the last, targets all but the first.
    /// The batch is as long as its longest window, padded on the left so that every row ends at
    /// the same column (the recurrence then sees padding only before the first event).
    ///
    /// With `first_item_target`, a window no longer than `max_len` (so a whole training sequence)
    /// also predicts its first item from the empty history at the padding column before it, as
    /// the reference code's label alignment does.
    pub fn new(windows: &[&[u32]], max_len: usize, first_item_target: bool, device: &Device) -> candle_core::Result<Self> {
        let predicts_first = |w: &[u32]| first_item_target && !w.is_empty() && w.len() <= max_len;
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
            let pairs = window.len().saturating_sub(1);
            let offset = row * len + len - pairs;
            if predicts_first(window) {
                positions.push((offset - 1) as u32);
                targets.push(window[0]);
            }
            for t in 0..pairs {
                tokens[offset + t] = window[t];
                positions.push((offset + t) as u32);
                targets.push(window[t + 1]);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sequences_keep_their_tail_and_long_ones_slide_from_the_end() {
        let short: Vec<u32> = (1..=5).collect();
        let long: Vec<u32> = (1..=12).collect();
        let single = [9u32];
        let windows = training_windows(&[&short, &long, &single], 3, 4);
        // max_len 3 -> windows of 4 items; 5 < 4 + 4 so the short one is its last 4 items.
        assert_eq!(windows[0], &[2, 3, 4, 5]);
        // 12 >= 8: windows end at 12, 8 and 4.
        assert_eq!(windows[1], &[9, 10, 11, 12]);
        assert_eq!(windows[2], &[5, 6, 7, 8]);
        assert_eq!(windows[3], &[1, 2, 3, 4]);
        assert_eq!(windows.len(), 4, "a one-item sequence gives no pair");
    }

    #[test]
    fn length_grouping_covers_every_window_once_in_full_batches() {
        use rand::SeedableRng;
        let seqs: Vec<Vec<u32>> = (0..100).map(|i| vec![1; 2 + (i * 37) % 50]).collect();
        let windows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
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
        let batch = Batch::new(&[&[1, 2, 3, 4], &[7, 8]], 200, false, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![0, 0, 7]]);
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 4, 8]);
        assert_eq!(batch.num_targets, 4);
    }

    #[test]
    fn whole_sequences_also_predict_their_first_item_from_empty_history() {
        // max_len 3: [1, 2, 3, 4] is a cut window (4 items), [7, 8] a whole sequence.
        let batch = Batch::new(&[&[1, 2, 3, 4], &[7, 8]], 3, true, &Device::Cpu).unwrap();
        assert_eq!(batch.tokens.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![0, 0, 7]]);
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 4, 5]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![2, 3, 4, 7, 8]);
        let whole = Batch::new(&[&[5, 6, 7]], 3, true, &Device::Cpu).unwrap();
        assert_eq!(whole.tokens.to_vec2::<u32>().unwrap(), vec![vec![0, 5, 6]]);
        assert_eq!(whole.targets.to_vec1::<u32>().unwrap(), vec![5, 6, 7]);
    }
}
