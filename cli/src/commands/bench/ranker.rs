//! `llamarec bench ranker`: the ranker's model core in this process, no server.
//!
//! - Prefill tokens/s and Rank latency on the fixed 20-history/20-candidate MovieLens prompt,
//!   cold (instruction prefix cached, as the service does) and warm (the user's history cached
//!   too), for each thread count; resident memory.
//! - The paper's efficiency comparison (its Figure 3): one-pass verbalizer scoring against
//!   greedy generation of a ranked list of the 20 candidate titles with the same model, for
//!   synthetic titles of several average lengths; drawn as a PNG.
//!
//! candle, gemm and rayon size their thread pools from `RAYON_NUM_THREADS` /
//! `CANDLE_NUM_THREADS` once, at first use, so each thread count is measured in a child
//! process of this binary (`--worker`) started with those variables; the child reports the
//! CPU time over wall time of its prefill, which shows how many cores it really used.

use super::probe::{load_average, machine, now_utc, proc_status_kb, RunnableSampler};
use super::write_json;
use crate::commands::rank::{load_ranker, ModelArgs};
use anyhow::{bail, Context, Result};
use llamarec_common::bench::{median, process_cpu_s};
use llamarec_common::config::ConfigLayers;
use llamarec_common::rng::Rng;
use ranker_service::generate::GreedyDecoder;
use ranker_service::sample::movielens_request;
use ranker_service::{KvCache, Llama, Positions, PromptRenderer, PromptTemplate, RankerModelConfig, ScoreInput, TokenBatch, Tokenizer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The instruction of the generation baseline: the paper's task, answered with the whole
/// ranked list of titles instead of one letter.
const GENERATION_INSTRUCTION: &str = "Given user history in chronological order, rank all items in the candidate pool from most to least likely to be chosen next. Answer with their titles, one per line.";

/// Single-token words (with and without a leading space, checked at run time) for synthetic
/// titles of an exact token length.
const TITLE_WORDS: [&str; 48] = [
    "red", "blue", "night", "river", "city", "love", "story", "dark", "last", "first", "great", "little", "house", "man", "woman", "time", "day", "world",
    "king", "star", "war", "dream", "home", "road", "heart", "light", "life", "game", "summer", "winter", "street", "secret", "lost", "wild", "golden",
    "black", "white", "green", "old", "new", "sea", "sun", "moon", "fire", "water", "stone", "island", "garden",
];

/// Candidates per request (and history items) in the comparison, as in the paper.
const LIST_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Worker {
    /// Prefill and Rank latency on the MovieLens prompt.
    Scoring,
    /// One-pass scoring against generating the ranked list.
    Generation,
}

#[derive(Debug, clap::Args)]
pub struct RankerBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write the results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to draw the scoring-vs-generation plot (PNG).
    #[arg(long, default_value = "docs/ranker_scoring_vs_generation.png")]
    plot: PathBuf,
    /// Thread counts for the prefill/Rank series, each measured in its own process.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed runs per prefill/Rank measurement (after one warm-up run); medians are reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Average title lengths (tokens) of the scoring-vs-generation comparison.
    #[arg(long, value_delimiter = ',', default_value = "5,10,20,30,40")]
    title_lengths: Vec<usize>,
    /// Generations per title length (each is 20 x (length + 1) tokens: keep this small).
    #[arg(long, default_value_t = 1)]
    generation_reps: usize,
    /// Threads of the comparison [default: the largest of --threads].
    #[arg(long)]
    generation_threads: Option<usize>,
    /// Skip the scoring-vs-generation comparison.
    #[arg(long)]
    no_generation: bool,
    /// Internal: run one part in this process and write its JSON to --worker-out.
    #[arg(long, value_enum, hide = true, requires = "worker_out")]
    worker: Option<Worker>,
    #[arg(long, hide = true)]
    worker_out: Option<PathBuf>,
}

pub async fn run(layers: &ConfigLayers, args: RankerBenchArgs) -> Result<()> {
    let config = args.model.config(layers)?;
    if let (Some(worker), Some(out)) = (args.worker, &args.worker_out) {
        let value = match worker {
            Worker::Scoring => scoring_worker(&config, args.iters)?,
            Worker::Generation => generation_worker(&config, &args.title_lengths, args.iters.max(3), args.generation_reps.max(1))?,
        };
        return write_json(out, &value);
    }
    if !config.model.exists() {
        bail!("{} is missing: run `llamarec fetch`", config.model.display());
    }
    let started = now_utc();
    let load_before = load_average();
    let mut scoring = Vec::new();
    for &t in &args.threads {
        eprintln!("scoring with {t} thread(s) ...");
        scoring.push(spawn_worker(layers, &args, Worker::Scoring, t)?);
    }
    let generation_threads = args.generation_threads.or(args.threads.iter().copied().max()).unwrap_or(2);
    let generation = if args.no_generation {
        Value::Null
    } else {
        eprintln!("scoring vs generation with {generation_threads} thread(s) ...");
        let g = spawn_worker(layers, &args, Worker::Generation, generation_threads)?;
        draw_plot(&args.plot, &g).with_context(|| format!("drawing {}", args.plot.display()))?;
        eprintln!("wrote {}", args.plot.display());
        g
    };
    let report = json!({
        "bench": "ranker",
        "started_utc": started,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "model": config.model.display().to_string(),
        "template": config.template.name,
        "precision": config.precision,
        "scoring": scoring,
        "scoring_vs_generation": generation,
        "plot": (!args.no_generation).then(|| args.plot.display().to_string()),
    });
    print_summary(&report);
    match &args.json {
        Some(path) => write_json(path, &report),
        None => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// Runs one part in a child process with `threads` CPU threads and returns its JSON.
fn spawn_worker(layers: &ConfigLayers, args: &RankerBenchArgs, worker: Worker, threads: usize) -> Result<Value> {
    let out = std::env::temp_dir().join(format!("llamarec-bench-ranker-{}-{worker:?}-{threads}.json", std::process::id()));
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(file) = layers.file() {
        cmd.arg("--config").arg(file);
    }
    cmd.args(["bench", "ranker"]);
    if let Some(t) = &args.model.template {
        cmd.args(["--template", t]);
    }
    if let Some(m) = &args.model.model {
        cmd.arg("--model").arg(m);
    }
    if let Some(t) = &args.model.tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    if args.model.quantized {
        cmd.arg("--quantized");
    }
    let lengths: Vec<String> = args.title_lengths.iter().map(usize::to_string).collect();
    cmd.args([
        "--iters",
        &args.iters.to_string(),
        "--title-lengths",
        &lengths.join(","),
        "--generation-reps",
        &args.generation_reps.to_string(),
    ]);
    let worker_name = match worker {
        Worker::Scoring => "scoring",
        Worker::Generation => "generation",
    };
    cmd.args(["--worker", worker_name]).arg("--worker-out").arg(&out);
    cmd.env("RAYON_NUM_THREADS", threads.to_string()).env("CANDLE_NUM_THREADS", threads.to_string());
    let status = cmd.status().context("starting a benchmark worker")?;
    if !status.success() {
        bail!("the {worker_name} worker with {threads} thread(s) failed: {status}");
    }
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    let mut value: Value = serde_json::from_str(&text)?;
    value["threads_requested"] = threads.into();
    Ok(value)
}

/// Median wall seconds and median CPU-over-wall ratio of `f` over `iters` runs, after one
/// warm-up run.
fn time<F: FnMut() -> Result<()>>(iters: usize, mut f: F) -> Result<(f64, f64)> {
    f()?;
    let (mut walls, mut ratios) = (Vec::new(), Vec::new());
    for _ in 0..iters.max(1) {
        let (t, c) = (Instant::now(), process_cpu_s());
        f()?;
        let wall = t.elapsed().as_secs_f64();
        walls.push(wall);
        ratios.push((process_cpu_s() - c) / wall);
    }
    Ok((median(walls), median(ratios)))
}

fn scoring_worker(config: &RankerModelConfig, iters: usize) -> Result<Value> {
    let rss_start = proc_status_kb("VmRSS");
    let t = Instant::now();
    let ranker = load_ranker(config)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_loaded = proc_status_kb("VmRSS");
    let (history, candidates) = movielens_request();
    let request = ranker.prepare(&history, &candidates)?;
    let ids = &request.prompt.ids;
    let model = ranker.model();
    let batch = TokenBatch::left_padded(&[ids], model.device())?;
    let sampler = RunnableSampler::start();
    let (prefill_s, prefill_cpu_over_wall) = time(iters, || {
        model.forward(&batch, None, None, Positions::Last)?;
        Ok(())
    })?;
    let runnable_threads = sampler.stop();
    let rank = |history_cache: Option<&KvCache>, want_history_cache: bool| -> Result<ranker_service::Scores> {
        Ok(ranker
            .score_batch(&[ScoreInput {
                request: &request,
                history_cache,
                want_history_cache,
            }])?
            .remove(0))
    };
    let (cold_s, _) = time(iters, || rank(None, false).map(drop))?;
    let (cold_capture_s, _) = time(iters, || rank(None, true).map(drop))?;
    let cached = rank(None, true)?.history_cache.context("the MovieLens prompt should be splittable")?;
    let (warm_s, _) = time(iters, || rank(Some(&cached), false).map(drop))?;
    let warm_tokens = rank(Some(&cached), false)?.tokens_run;
    let cold_tokens = rank(None, false)?.tokens_run;
    Ok(json!({
        "candle_threads": candle_core::utils::get_num_threads(),
        "os_threads": proc_status_kb("Threads"),
        "iters": iters,
        "load_s": load_s,
        "prompt_tokens": ids.len(),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": ids.len() as f64 / prefill_s,
        "prefill_cpu_over_wall": prefill_cpu_over_wall,
        "prefill_runnable_threads": runnable_threads,
        "rank_cold_s": cold_s,
        "rank_cold_tokens_run": cold_tokens,
        "rank_cold_with_history_capture_s": cold_capture_s,
        "rank_warm_s": warm_s,
        "rank_warm_tokens_run": warm_tokens,
        "warm_over_cold": warm_s / cold_s,
        "history_cache_bytes": cached.size_bytes(),
        "rss_start_mb": rss_start as f64 / 1024.0,
        "rss_after_load_mb": rss_loaded as f64 / 1024.0,
        "rss_end_mb": proc_status_kb("VmRSS") as f64 / 1024.0,
        "rss_peak_mb": proc_status_kb("VmHWM") as f64 / 1024.0,
    }))
}

fn generation_worker(config: &RankerModelConfig, lengths: &[usize], score_iters: usize, reps: usize) -> Result<Value> {
    let longest = lengths.iter().copied().max().unwrap_or(0);
    // The template's 32-token title cap would cut the longest synthetic titles.
    let mut config = config.clone();
    config.template.max_title_tokens = config.template.max_title_tokens.max(longest + 8);
    let ranker = load_ranker(&config)?;
    let model = ranker.model();
    let tokenizer = ranker.renderer().tokenizer().clone();
    let template = PromptTemplate {
        instruction: GENERATION_INSTRUCTION.into(),
        ..config.template.clone()
    };
    let gen_renderer = PromptRenderer::new(template, tokenizer.clone())?;
    // The generation prompt's fixed prefix is cached once, like the ranker's.
    let gen_prefix = model
        .forward(
            &TokenBatch::left_padded(&[gen_renderer.prefix_ids()], model.device())?,
            None,
            None,
            Positions::Last,
        )?
        .cache;
    let separator_tokens = tokenizer.encode("\n")?.len();
    let eos: Vec<u32> = tokenizer.eos_id().into_iter().collect();
    let words = single_token_words(&tokenizer)?;

    let mut points = Vec::new();
    for (n, &len) in lengths.iter().enumerate() {
        let titles = synthetic_titles(&words, len, 2 * LIST_LEN, n as u64);
        let measured_len = titles
            .iter()
            .map(|t| tokenizer.encode(t).map(|ids| ids.len()))
            .sum::<ranker_service::Result<usize>>()? as f64
            / titles.len() as f64;
        let (history, candidates) = titles.split_at(LIST_LEN);

        let request = ranker.prepare(history, candidates)?;
        let input = ScoreInput {
            request: &request,
            history_cache: None,
            want_history_cache: false,
        };
        let (score_s, _) = time(score_iters, || ranker.score_batch(&[input]).map(drop).map_err(Into::into))?;

        let prompt = gen_renderer.tokenize(&gen_renderer.render(history, candidates)?)?;
        let budget = LIST_LEN * (len + separator_tokens);
        let mut runs = Vec::new();
        let mut sample = None;
        for _ in 0..reps {
            let run = generate_timed(model, &prompt.ids, prompt.splittable.then_some((prompt.prefix_len, &gen_prefix)), budget)?;
            if sample.is_none() {
                let first_eos = run.tokens.iter().position(|t| eos.contains(t));
                let text = tokenizer.decode(&run.tokens[..run.tokens.len().min(60)])?;
                sample = Some(json!({"first_eos_at": first_eos, "text_start": text}));
            }
            runs.push(run);
        }
        let gen_s = median(runs.iter().map(|r| r.total_s).collect());
        let first_token_s = median(runs.iter().map(|r| r.first_token_s).collect());
        let decode_tps = median(runs.iter().map(|r| (budget - 1) as f64 / (r.total_s - r.first_token_s)).collect());
        eprintln!(
            "title length {len:>2}: prompt {} tokens, scoring {score_s:.3} s, generating {budget} tokens {gen_s:.1} s ({decode_tps:.1} tok/s), ratio {:.0}",
            request.prompt.ids.len(),
            gen_s / score_s
        );
        points.push(json!({
            "title_tokens": len,
            "title_tokens_measured": measured_len,
            "scoring_prompt_tokens": request.prompt.ids.len(),
            "generation_prompt_tokens": prompt.ids.len(),
            "scoring_s": score_s,
            "generated_tokens": budget,
            "generation_s": gen_s,
            "generation_first_token_s": first_token_s,
            "generation_decode_tokens_per_s": decode_tps,
            "generation_over_scoring": gen_s / score_s,
            "generation_reps": reps,
            "generated_sample": sample,
        }));
    }
    Ok(json!({
        "candle_threads": candle_core::utils::get_num_threads(),
        "list_length": LIST_LEN,
        "separator_tokens": separator_tokens,
        "generation_instruction": GENERATION_INSTRUCTION,
        "decoding": "greedy with the KV cache, forced to the full budget (no stop token)",
        "scoring_iters": score_iters,
        "points": points,
        "rss_peak_mb": proc_status_kb("VmHWM") as f64 / 1024.0,
    }))
}

struct TimedGeneration {
    tokens: Vec<u32>,
    first_token_s: f64,
    total_s: f64,
}

/// Generates exactly `budget` tokens greedily, timing the prefill (first token) separately.
fn generate_timed(model: &Llama, ids: &[u32], prefix: Option<(usize, &KvCache)>, budget: usize) -> Result<TimedGeneration> {
    let t = Instant::now();
    let mut decoder = match prefix {
        Some((len, cache)) => GreedyDecoder::prefill(model, &ids[len..], Some(cache))?,
        None => GreedyDecoder::prefill(model, ids, None)?,
    };
    let first_token_s = t.elapsed().as_secs_f64();
    let mut tokens = Vec::with_capacity(budget);
    while tokens.len() + 1 < budget {
        tokens.push(decoder.step()?);
    }
    tokens.push(decoder.next_token());
    Ok(TimedGeneration {
        tokens,
        first_token_s,
        total_s: t.elapsed().as_secs_f64(),
    })
}

/// The words of [`TITLE_WORDS`] that are one token both alone and after a space.
fn single_token_words(tokenizer: &Tokenizer) -> Result<Vec<&'static str>> {
    let mut words = Vec::new();
    for w in TITLE_WORDS {
        if tokenizer.encode(w)?.len() == 1 && tokenizer.encode(&format!(" {w}"))?.len() == 1 {
            words.push(w);
        }
    }
    if words.len() < 8 {
        bail!("the tokenizer has too few single-token words for synthetic titles");
    }
    Ok(words)
}

/// `count` distinct-looking titles of `len` single-token words, deterministic per `seed`.
fn synthetic_titles(words: &[&str], len: usize, count: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| (0..len.max(1)).map(|_| words[rng.below(words.len())]).collect::<Vec<_>>().join(" "))
        .collect()
}


/// A short human summary on stderr (the JSON has everything).
fn print_summary(report: &Value) {
    for s in report["scoring"].as_array().into_iter().flatten() {
        eprintln!(
            "threads {} ({:.2} runnable, cpu/wall {:.2}): prefill {:.0} tok/s ({} tokens), Rank cold {:.0} ms, warm {:.0} ms (x{:.2}), peak RSS {:.0} MB",
            s["threads_requested"],
            s["prefill_runnable_threads"].as_f64().unwrap_or(0.0),
            s["prefill_cpu_over_wall"].as_f64().unwrap_or(0.0),
            s["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            s["prompt_tokens"],
            s["rank_cold_s"].as_f64().unwrap_or(0.0) * 1e3,
            s["rank_warm_s"].as_f64().unwrap_or(0.0) * 1e3,
            s["warm_over_cold"].as_f64().unwrap_or(0.0),
            s["rss_peak_mb"].as_f64().unwrap_or(0.0),
        );
    }
}

/// Seconds per request against title length, log scale, with the ratio written at each
/// length. Text needs a TrueType font: DejaVu Sans (Debian `fonts-dejavu-core`); without it
/// the plot is drawn without text.
fn draw_plot(path: &Path, generation: &Value) -> Result<()> {
    use plotters::prelude::*;

    let points = generation["points"].as_array().context("no points")?;
    let get = |p: &Value, k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    let xs: Vec<f64> = points.iter().map(|p| get(p, "title_tokens")).collect();
    let score: Vec<(f64, f64)> = points.iter().map(|p| (get(p, "title_tokens"), get(p, "scoring_s"))).collect();
    let gen: Vec<(f64, f64)> = points.iter().map(|p| (get(p, "title_tokens"), get(p, "generation_s"))).collect();
    if xs.is_empty() {
        bail!("no points to draw");
    }
    let x_max = xs.iter().copied().fold(0.0, f64::max) + 3.0;
    let y_min = score.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) / 2.0;
    let y_max = gen.iter().map(|p| p.1).fold(0.0, f64::max) * 3.0;
    let text = register_font();

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let threads = generation["candle_threads"].as_u64().unwrap_or(0);
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if text { 50 } else { 10 })
        .y_label_area_size(if text { 80 } else { 10 });
    if text {
        builder.caption(
            format!("Verbalizer scoring vs generating the ranked list of 20 titles (SmolLM2-135M, CPU, {threads} threads)"),
            ("sans-serif", 20),
        );
    }
    let mut chart = builder.build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if text {
        mesh.x_desc("average title length (tokens)")
            .y_desc("seconds per request (log scale)")
            .label_style(("sans-serif", 16))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&log_label);
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;

    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let series = chart.draw_series(LineSeries::new(score.clone(), blue.stroke_width(3)))?;
    if text {
        series
            .label("one forward pass, letter logits (LlamaRec)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], blue.stroke_width(3)));
    }
    chart.draw_series(score.iter().map(|p| Circle::new(*p, 5, blue.filled())))?;
    let series = chart.draw_series(LineSeries::new(gen.clone(), orange.stroke_width(3)))?;
    if text {
        series
            .label("greedy generation of the ranked title list (Nx: its time over scoring)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], orange.stroke_width(3)));
    }
    chart.draw_series(gen.iter().map(|p| Circle::new(*p, 5, orange.filled())))?;
    if text {
        let ratios = points.iter().map(|p| {
            let (x, y) = (get(p, "title_tokens"), get(p, "generation_s"));
            Text::new(
                format!("{:.0}x", get(p, "generation_over_scoring")),
                (x - 0.6, y * 1.5),
                ("sans-serif", 16).into_font().color(&BLACK),
            )
        });
        chart.draw_series(ratios)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Labels of a log axis at 1, 2 and 5 times powers of ten only (the others stay as ticks).
fn log_label(y: &f64) -> String {
    let lead = *y / 10f64.powf(y.log10().floor());
    if [1.0, 2.0, 5.0].iter().any(|d| (lead - d).abs() < 1e-6) {
        format!("{y}")
    } else {
        String::new()
    }
}

/// Registers DejaVu Sans as "sans-serif" for plot text; false when no font file is found.
pub(crate) fn register_font() -> bool {
    const CANDIDATES: [&str; 2] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
    let Some(bytes) = CANDIDATES.iter().find_map(|p| std::fs::read(p).ok()) else {
        eprintln!("no DejaVuSans.ttf (Debian: apt-get install fonts-dejavu-core): drawing the plot without text");
        return false;
    };
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::synthetic_titles;

    #[test]
    fn synthetic_titles_have_the_asked_word_count_and_vary() {
        let words = ["a", "b", "c", "d"];
        let titles = synthetic_titles(&words, 7, 40, 3);
        assert_eq!(titles.len(), 40);
        assert!(titles.iter().all(|t| t.split(' ').count() == 7));
        assert!(titles.iter().collect::<std::collections::HashSet<_>>().len() > 30);
        assert_eq!(titles, synthetic_titles(&words, 7, 40, 3));
    }
}
