//! `llamarec bench train-step`: seconds per LoRA training example of the ranker, on the fixed
//! 20-history/20-candidate MovieLens prompt, the shipped recipe's LoRA (r 8, alpha 32, dropout
//! .05 on q/v), loss on the answer token, one AdamW update per example: what
//! `llamarec train ranker` spends per example, without data loading or validation.
//!
//! Each backprop implementation (native, autograd) runs in this process one after the other,
//! so their ratio comes from one run. Threads: `RAYON_NUM_THREADS` (default: every core), the
//! same variable the PyTorch peer's `--threads` mirrors. `--prompt-out` writes the prompt's
//! token ids and answer for the peer (`bench/peers/torch_peer.py`), so both time the same
//! tokens.

use super::probe::{load_average, machine, now_utc, proc_status_kb};
use super::write_json;
use crate::commands::rank::{load_ranker, ModelArgs};
use anyhow::{bail, Result};
use candle_core::Tensor;
use llamarec_common::bench::{median, process_cpu_times};
use llamarec_common::config::ConfigLayers;
use ranker_service::sample::movielens_request;
use ranker_service::train::{AdamW, AdamWConfig, Backprop, ExampleGradients, ExampleInput, RankerTrainConfig, TrainableLora};
use ranker_service::Verbalizer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct TrainStepBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write the results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Backprop implementations to time, in this order.
    #[arg(long, value_delimiter = ',', default_value = "native,autograd")]
    backprop: Vec<BackpropArg>,
    /// Timed examples per implementation (after one warm-up example); medians are reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// The answer's candidate index (0 = A).
    #[arg(long, default_value_t = 7)]
    label: usize,
    /// Write the prompt's ids and answer token as JSON for the PyTorch peer.
    #[arg(long)]
    prompt_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackpropArg {
    /// The hand-derived f32 CPU step.
    Native,
    /// The native step with the frozen products in bf16 (AMX / AVX-512 BF16 CPUs only).
    NativeBf16,
    /// candle's autograd.
    Autograd,
}

pub fn run(layers: &ConfigLayers, args: TrainStepBenchArgs) -> Result<()> {
    let mut config = args.model.config(layers)?;
    // Training reads dense f32 weights (the bf16 frozen products are packed by the step itself).
    config.precision = ranker_service::WeightPrecision::F32;
    if !config.model.exists() {
        bail!("{} is missing: run `llamarec fetch`", config.model.display());
    }
    let started = now_utc();
    let load_before = load_average();
    let ranker = load_ranker(&config)?;
    let verbalizer = Verbalizer::new(ranker.renderer())?;
    let (history, candidates) = movielens_request();
    let ids = ranker.prepare(&history, &candidates)?.prompt.ids;
    if args.label >= candidates.len() {
        bail!("--label {} but the prompt has {} candidates", args.label, candidates.len());
    }
    let label_token = verbalizer.token_ids()[args.label];
    if let Some(path) = &args.prompt_out {
        write_json(
            path,
            &json!({
                "source": "llamarec bench train-step: ranker_service::sample::movielens_request, the configured template",
                "ids": ids,
                "label": args.label,
                "label_token": label_token,
            }),
        )?;
    }
    let recipe = RankerTrainConfig::default();
    // As `llamarec train ranker` does: freed activations stay in the heap.
    ranker_service::train::tune_allocator();
    let mut results = Vec::new();
    for &which in &args.backprop {
        let backprop = match which {
            BackpropArg::Native => Backprop::Native,
            BackpropArg::NativeBf16 => Backprop::NativeBf16,
            BackpropArg::Autograd => Backprop::Autograd,
        };
        eprintln!("{which:?}: {} tokens, 1 warm-up + {} timed examples ...", ids.len(), args.iters);
        results.push(time_backprop(ranker.model(), &verbalizer, &recipe, backprop, &ids, args.label, args.iters)?);
    }
    let per_example = |name: &str| {
        results
            .iter()
            .find(|r| r["backprop"] == name)
            .and_then(|r| r["seconds_per_example"].as_f64())
    };
    let speedup = match (per_example("native"), per_example("autograd")) {
        (Some(n), Some(a)) => json!(a / n),
        _ => Value::Null,
    };
    let report = json!({
        "bench": "train-step",
        "started_utc": started,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "model": config.model.display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "prompt_tokens": ids.len(),
        "label_token": label_token,
        "lora": { "r": recipe.r, "alpha": recipe.alpha, "dropout": recipe.dropout, "targets": recipe.targets },
        "loss": recipe.loss,
        "results": results,
        "autograd_over_native": speedup,
        "peak_rss_mb": proc_status_kb("VmHWM") as f64 / 1024.0,
    });
    for r in report["results"].as_array().into_iter().flatten() {
        eprintln!(
            "{}: {:.2} s per example (cpu/wall {:.2}, sys share {:.0}%), loss {:.3}",
            r["backprop"].as_str().unwrap_or(""),
            r["seconds_per_example"].as_f64().unwrap_or(0.0),
            r["cpu_over_wall"].as_f64().unwrap_or(0.0),
            100.0 * r["sys_share"].as_f64().unwrap_or(0.0),
            r["first_loss"].as_f64().unwrap_or(0.0),
        );
    }
    match &args.json {
        Some(path) => write_json(path, &report),
        None => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// Median seconds of `iters` training examples (gradients plus one AdamW update each).
fn time_backprop(
    model: &ranker_service::Llama,
    verbalizer: &Verbalizer,
    recipe: &RankerTrainConfig,
    backprop: Backprop,
    ids: &[u32],
    label: usize,
    iters: usize,
) -> Result<Value> {
    let mut lora = TrainableLora::init(model, recipe, recipe.seed)?;
    let mut engine = ExampleGradients::new(model, &lora, backprop)?;
    let mut opt = AdamW::new(
        &lora.params,
        AdamWConfig {
            weight_decay: recipe.weight_decay,
            beta1: recipe.beta1,
            beta2: recipe.beta2,
            eps: recipe.eps,
        },
    )?;
    let (mut walls, mut losses) = (Vec::new(), Vec::new());
    let (mut user, mut sys) = (0.0, 0.0);
    for i in 0..=iters.max(1) {
        let (t, (u0, s0)) = (Instant::now(), process_cpu_times());
        let mut acc: Vec<Option<Tensor>> = vec![None; lora.params.len()];
        let example = ExampleInput { ids, label, num_candidates: 20 };
        let loss = engine.add(&mut lora, verbalizer, example, recipe.loss, (recipe.dropout as f32, i as u64), 1.0, &mut acc)?;
        let grads = acc
            .into_iter()
            .zip(&lora.params)
            .map(|(g, p)| g.map_or_else(|| p.var.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        opt.step(&lora.params, &grads, 1e-4, Some(recipe.max_grad_norm))?;
        let wall = t.elapsed().as_secs_f64();
        let (u1, s1) = process_cpu_times();
        if i > 0 {
            walls.push(wall);
            user += u1 - u0;
            sys += s1 - s0;
        }
        losses.push(loss);
    }
    let total_wall: f64 = walls.iter().sum();
    Ok(json!({
        "backprop": match backprop { Backprop::Native => "native", Backprop::NativeBf16 => "native_bf16", _ => "autograd" },
        "engine": engine.describe(),
        "seconds_per_example": median(walls.clone()),
        "samples_s": walls,
        "tokens_per_s": ids.len() as f64 / median(walls.clone()),
        "cpu_over_wall": (user + sys) / total_wall,
        "sys_share": sys / (user + sys).max(1e-9),
        "first_loss": losses[0],
        "losses": losses,
        "native": engine.is_native(),
    }))
}
