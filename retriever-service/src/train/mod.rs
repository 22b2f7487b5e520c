//! The training loop: AdamW on cross-entropy over all items at every position, validation
//! Recall@10 after each epoch, early stopping, a resumable checkpoint directory and a report.

pub mod batch;
pub mod dropout;
pub mod evaluate;
pub mod ffn;
pub mod init;
pub mod lru;
pub mod model;
pub mod norm;
pub mod ops;
pub mod optim;
pub mod params;
pub mod sasrec;
pub mod scan;
pub mod sequence_model;

use crate::train::batch::{length_grouped_batches, training_windows, Batch, TrainWindow, Windowing};
use crate::catalog::CatalogItem;
use crate::checkpoint::{
    read_json, write_json, CONFIG_FILE, ITEMS_FILE, LAST_MODEL_FILE, MODEL_FILE, OPTIMIZER_FILE, REPORT_FILE,
    TRAINER_STATE_FILE,
};
use crate::config::LruRecConfig;
use crate::train::dropout::DropoutRng;
use crate::encoder::Encoder;
use crate::error::{Result, RetrieverError};
use crate::train::evaluate::{evaluate, split_cases};
use crate::train::sequence_model::SequenceModel;
use crate::train::optim::{AdamW, AdamWConfig};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use llamarec_common::data::{Dataset, Split};
use llamarec_common::ranking_metrics::MetricReport;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Training recipe (defaults: the paper's ML-100K settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model shape and dropout; `num_items` is taken from the data set.
    pub model: LruRecConfig,
    /// Optimiser.
    pub optimizer: AdamWConfig,
    /// Windows per batch.
    pub batch_size: usize,
    /// Upper bound on epochs.
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation Recall@10.
    pub patience: usize,
    /// Global gradient-norm clip (None: no clipping).
    pub grad_clip: Option<f64>,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Stride of the sliding windows over histories longer than `model.max_len`
    /// (None: `model.max_len`, non-overlapping).
    pub sliding_step: Option<usize>,
    /// Train every item once, past the first `max_len` with (nearly) a full window of history:
    /// overlapping windows every `sliding_step` items, each predicting only the items no earlier
    /// window did (`sliding_step` 1: every prefix, as RecBole trains SASRec). Off: the reference
    /// code's windows, every pair of each trained, items before the earliest one left out.
    pub each_target_once: bool,
    /// Also train each whole sequence's first item as a prediction from the empty history.
    pub first_item_target: bool,
    /// Batch windows of similar length (little padding, ~2x faster epochs on ML-100K) instead of
    /// uniformly at random as the reference code does (the default). Each batch is one optimiser
    /// step either way, so grouping also gives the few targets of a short-history batch a whole
    /// step; on ML-100K it selected a checkpoint with lower validation Recall@10.
    pub group_by_length: bool,
    /// Threads for validation and test scoring.
    pub eval_threads: usize,
    /// Threads of the training step's kernels (candle's CPU ops and matrix products read
    /// `RAYON_NUM_THREADS`; `llamarec train retriever` sets it from this unless it is already
    /// set); 0 = one per core. 1 by default: the products of this model are small (≤ 64 × 256
    /// weights), and on the 2-vCPU machines a second thread's fork/join per operation cost more
    /// than it gave (4 SASRec epochs took 19 % longer with two; BENCHMARKS.md "Retriever
    /// ensembles and training threads"). The other core is better spent on a second run.
    pub compute_threads: usize,
    /// Stop (keeping the best checkpoint) once this much wall time has been spent.
    pub time_limit_s: Option<f64>,
    /// Continue from `trainer_state.json` when the output directory has one.
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: LruRecConfig::default(),
            optimizer: AdamWConfig::default(),
            batch_size: 16,
            max_epochs: 200,
            patience: 10,
            grad_clip: Some(5.0),
            seed: 42,
            sliding_step: None,
            each_target_once: false,
            first_item_target: true,
            group_by_length: false,
            eval_threads: 2,
            compute_threads: 1,
            time_limit_s: None,
            resume: true,
            progress: true,
        }
    }
}

/// One epoch in the training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training cross-entropy per predicted position.
    pub train_loss: f64,
    /// Validation Recall@10.
    pub val_recall_at_10: f64,
    /// Validation NDCG@10.
    pub val_ndcg_at_10: f64,
    /// Wall time of the epoch including validation, seconds.
    pub seconds: f64,
}

/// Counters that let a run resume where it stopped (`trainer_state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser updates applied.
    pub optimizer_steps: u64,
    /// Epoch of the best validation Recall@10 (0: none yet).
    pub best_epoch: usize,
    /// Best validation metrics so far.
    pub best_validation: Option<MetricReport>,
    /// Epochs since the best one.
    pub epochs_without_improvement: usize,
    /// Wall time spent over all runs, seconds.
    pub elapsed_s: f64,
    /// Wall time when the best epoch finished, seconds.
    pub time_to_best_s: f64,
    /// Whether early stopping (or the time limit) ended training.
    pub finished: bool,
    /// Per-epoch log.
    pub history: Vec<EpochLog>,
}

/// Data set figures recorded in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    /// Data set name.
    pub name: String,
    /// Users.
    pub users: usize,
    /// Items (padding excluded).
    pub items: usize,
    /// Interactions after preprocessing.
    pub interactions: usize,
    /// Longest user sequence.
    pub max_sequence_length: usize,
    /// Training windows per epoch.
    pub training_windows: usize,
    /// Predicted positions per epoch.
    pub training_targets: usize,
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Data statistics.
    pub data: DataSummary,
    /// The recipe used.
    pub config: TrainConfig,
    /// Epochs run.
    pub epochs: usize,
    /// Epoch whose weights are in `model.safetensors`.
    pub best_epoch: usize,
    /// Total training wall time, seconds (2-core machine shared with other jobs: noisy).
    pub wall_time_s: f64,
    /// Wall time until the best epoch finished, seconds.
    pub time_to_best_s: f64,
    /// Validation metrics of the best epoch.
    pub validation: MetricReport,
    /// Test metrics of the best epoch (computed once, after training).
    pub test: MetricReport,
    /// Per-epoch log.
    pub history: Vec<EpochLog>,
}

fn epoch_rng(seed: u64, epoch: usize, stream: u64) -> StdRng {
    // Every epoch gets its own generators, so a resumed run draws exactly what an uninterrupted
    // one would have.
    StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The catalog entries of `dataset` with training popularity.
pub fn catalog_items(dataset: &Dataset) -> Vec<CatalogItem> {
    let counts = dataset.train_popularity();
    dataset
        .items
        .iter()
        .zip(counts)
        .map(|(item, train_count)| CatalogItem { id: item.id.clone(), title: item.title.clone(), train_count })
        .collect()
}

/// Trains the model that `config.model.kind` names (LRURec or SASRec) on `dataset` into the
/// checkpoint directory `out_dir` (created if needed) and returns the report also written to
/// `report.json`.
pub fn train(dataset: &Dataset, config: &TrainConfig, out_dir: &Path) -> Result<TrainReport> {
    let run_started = Instant::now();
    keep_freed_memory();
    let device = Device::Cpu;
    let mut config = config.clone();
    config.model.num_items = dataset.num_items();
    config.model.validate()?;
    if config.batch_size == 0 {
        return Err(RetrieverError::Config("batch_size must be positive".into()));
    }
    std::fs::create_dir_all(out_dir).map_err(RetrieverError::io(out_dir))?;

    let sequences: Vec<&[u32]> = (0..dataset.users.len()).map(|u| dataset.train_sequence(u)).collect();
    let step = config.sliding_step.unwrap_or(config.model.max_len);
    let windowing = if config.each_target_once { Windowing::EachTargetOnce { step } } else { Windowing::Sliding { step } };
    let windows = training_windows(&sequences, config.model.max_len, windowing);
    if windows.is_empty() {
        return Err(RetrieverError::NoData(format!("no user of {} has two training items", dataset.name)));
    }
    let stats = dataset.stats();
    let data = DataSummary {
        name: stats.name,
        users: stats.users,
        items: stats.items,
        interactions: stats.interactions,
        max_sequence_length: stats.max_sequence_length,
        training_windows: windows.len(),
        training_targets: windows.iter().map(|w| Batch::targets_of(w, config.model.max_len, config.first_item_target)).sum(),
    };
    let validation_cases = split_cases(dataset, Split::Validation);
    let test_cases = split_cases(dataset, Split::Test);
    write_json(&out_dir.join(CONFIG_FILE), &config.model)?;
    write_json(&out_dir.join(ITEMS_FILE), &catalog_items(dataset))?;

    let state_path = out_dir.join(TRAINER_STATE_FILE);
    let resuming = config.resume && state_path.is_file() && out_dir.join(LAST_MODEL_FILE).is_file();
    let (model, mut optimizer, mut state) = if resuming {
        let state: TrainerState = read_json(&state_path)?;
        let model = SequenceModel::load(&config.model, &out_dir.join(LAST_MODEL_FILE), &device)?;
        let optimizer = AdamW::load(model.params(), config.optimizer, &out_dir.join(OPTIMIZER_FILE), state.optimizer_steps)?;
        tracing::info!(epochs_done = state.epochs_done, best_epoch = state.best_epoch, "resuming retriever training");
        (model, optimizer, state)
    } else {
        let model = SequenceModel::init(&config.model, config.seed, &device)?;
        let optimizer = AdamW::new(model.params(), config.optimizer)?;
        (model, optimizer, TrainerState::default())
    };
    let elapsed_before = state.elapsed_s;

    let batches_per_epoch = windows.len().div_ceil(config.batch_size);
    let bar = ProgressBar::with_draw_target(
        Some(batches_per_epoch as u64),
        if config.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:25} {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );

    let mut order: Vec<usize> = (0..windows.len()).collect();
    while !state.finished && state.epochs_done < config.max_epochs {
        let epoch = state.epochs_done + 1;
        let epoch_started = Instant::now();
        bar.reset();
        bar.set_prefix(format!("epoch {epoch:>3}"));
        order.sort_unstable();
        let mut shuffle_rng = epoch_rng(config.seed, epoch, 1);
        order.shuffle(&mut shuffle_rng);
        let batches = if config.group_by_length {
            length_grouped_batches(&order, &windows, config.batch_size, &mut shuffle_rng)
        } else {
            order.chunks(config.batch_size).map(<[usize]>::to_vec).collect()
        };
        let mut dropout_rng = DropoutRng::new(epoch_rng(config.seed, epoch, 2));
        let (mut loss_sum, mut targets_seen) = (0.0f64, 0usize);
        for chunk in &batches {
            let batch_windows: Vec<TrainWindow<'_>> = chunk.iter().map(|&i| windows[i]).collect();
            let batch = Batch::new(&batch_windows, config.model.max_len, config.first_item_target, &device)?;
            let hidden = model.forward(&batch.tokens, Some(&mut dropout_rng))?;
            let hidden = hidden.flatten_to(1)?.index_select(&batch.positions, 0)?;
            let loss = crate::train::ops::cross_entropy(&model.scores(&hidden)?, &batch.targets)?;
            let grads = loss.backward()?;
            optimizer.step(model.params(), &grads, config.grad_clip)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * batch.num_targets as f64;
            targets_seen += batch.num_targets;
            bar.inc(1);
            bar.set_message(format!("loss {:.4}{}", loss_sum / targets_seen as f64, best_text(&state)));
        }

        let encoder = Encoder::new(model.config(), &model.tensors())?;
        let validation = evaluate(&encoder, &validation_cases, config.eval_threads)?;
        let (recall, ndcg) = (validation.get(10).recall, validation.get(10).ndcg);
        state.epochs_done = epoch;
        state.optimizer_steps = optimizer.steps();
        state.elapsed_s = elapsed_before + run_started.elapsed().as_secs_f64();
        let log = EpochLog {
            epoch,
            train_loss: loss_sum / targets_seen.max(1) as f64,
            val_recall_at_10: recall,
            val_ndcg_at_10: ndcg,
            seconds: epoch_started.elapsed().as_secs_f64(),
        };
        let improved = state.best_validation.as_ref().is_none_or(|best| recall > best.get(10).recall);
        if improved {
            model.save(&out_dir.join(MODEL_FILE))?;
            state.best_epoch = epoch;
            state.best_validation = Some(validation);
            state.epochs_without_improvement = 0;
            state.time_to_best_s = state.elapsed_s;
        } else {
            state.epochs_without_improvement += 1;
        }
        bar.println(format!(
            "epoch {epoch:>3}  loss {:.4}  val R@10 {recall:.4}  N@10 {ndcg:.4}  {:.1}s{}",
            log.train_loss,
            log.seconds,
            if improved { "  *best" } else { "" }
        ));
        tracing::info!(epoch, loss = log.train_loss, val_recall_at_10 = recall, val_ndcg_at_10 = ndcg, "retriever epoch");
        state.history.push(log);
        let out_of_time = config.time_limit_s.is_some_and(|limit| state.elapsed_s >= limit);
        state.finished = state.epochs_without_improvement >= config.patience || out_of_time;
        model.save(&out_dir.join(LAST_MODEL_FILE))?;
        optimizer.save(model.params(), &out_dir.join(OPTIMIZER_FILE))?;
        write_json(&state_path, &state)?;
    }
    bar.finish_and_clear();

    let best = SequenceModel::load(&config.model, &out_dir.join(MODEL_FILE), &device)?;
    let encoder = Encoder::new(best.config(), &best.tensors())?;
    let test = evaluate(&encoder, &test_cases, config.eval_threads)?;
    let report = TrainReport {
        data,
        config,
        epochs: state.epochs_done,
        best_epoch: state.best_epoch,
        wall_time_s: elapsed_before + run_started.elapsed().as_secs_f64(),
        time_to_best_s: state.time_to_best_s,
        validation: state.best_validation.clone().unwrap_or_default(),
        test,
        history: state.history,
    };
    write_json(&out_dir.join(REPORT_FILE), &report)?;
    Ok(report)
}

/// Makes glibc's allocator keep freed memory instead of returning it to the kernel.
///
/// Every candle operation allocates its output (megabytes per activation at batch 16 × 200) and
/// frees it soon after; with glibc's defaults large blocks are mapped and unmapped each time, and
/// zeroing the fresh pages took about 40% of a training step. This is a process-wide setting:
/// memory stays with the process until it exits.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is safe to call at any time.
    unsafe {
        // 32 MiB is glibc's ceiling for the mmap threshold; activations are below it.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn best_text(state: &TrainerState) -> String {
    match &state.best_validation {
        Some(best) => format!("  best val R@10 {:.4} (epoch {})", best.get(10).recall, state.best_epoch),
        None => String::new(),
    }
}
