//! `llamarec rank`: scores one history and candidate list through the configured prompt
//! template, in this process (no server), and prints each candidate's letter, logit and
//! probability. Also home of the model options shared by the ranker's local commands.

use anyhow::{bail, Context, Result};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use ranker_service::service_config::RankerServiceConfig;
use ranker_service::{LoadOptions, PromptTemplate, Ranker, RankerModelConfig, ScoreInput, WeightPrecision};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Which model, tokenizer and template a local ranker command loads.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file or an HF safetensors directory [default: the `[ranker]` section's model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A `tokenizer.json` to use instead of the configured one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prompt template: "alpaca" (the paper's) or "chatml" [default: the `[ranker]` section's].
    #[arg(long)]
    pub template: Option<String>,
    /// Keep quantized GGUF weights quantized (slow on CPU) instead of dequantizing to f32.
    #[arg(long)]
    pub quantized: bool,
}

impl ModelArgs {
    /// The `[ranker]` section's model (paths under `[assets] dir`) with these options applied.
    /// Its LoRA adapter, if any, is not applied: these commands run the base model.
    pub fn config(&self, layers: &ConfigLayers) -> Result<RankerModelConfig> {
        let assets = layers.section::<AssetsConfig>()?;
        let mut config = layers.section::<RankerServiceConfig>()?.model_config(&assets);
        if let Some(model) = &self.model {
            config.model = model.clone();
        }
        if let Some(tokenizer) = &self.tokenizer {
            config.tokenizer = Some(tokenizer.clone());
        }
        if let Some(name) = &self.template {
            let Some(template) = PromptTemplate::builtin(name) else {
                bail!("unknown template {name:?}: use \"alpaca\" or \"chatml\"");
            };
            config.template = template;
        }
        if self.quantized {
            config.precision = WeightPrecision::Quantized;
        }
        Ok(config)
    }
}

/// Loads the ranker (model, tokenizer, verbalizer, prefix cache) on the CPU.
pub fn load_ranker(config: &RankerModelConfig) -> Result<Ranker> {
    Ranker::load(config, &LoadOptions::default()).with_context(|| format!("loading the ranker from {}", config.model.display()))
}

#[derive(Debug, clap::Args)]
pub struct RankArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// History titles, oldest first, separated by "|".
    #[arg(long, conflicts_with = "input")]
    history: Option<String>,
    /// Candidate titles, in retriever order, separated by "|" (at most one per index letter).
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    candidates: Option<String>,
    /// A JSON file `{"history": [titles], "candidates": [titles]}` instead of the two flags.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print the rendered prompt before the scores.
    #[arg(long)]
    show_prompt: bool,
}

/// The `--input` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RankInput {
    #[serde(default)]
    history: Vec<String>,
    candidates: Vec<String>,
}

pub fn run(layers: &ConfigLayers, args: RankArgs) -> Result<()> {
    let input = match &args.input {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<RankInput>(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => RankInput {
            history: split_titles(args.history.as_deref().unwrap_or("")),
            candidates: split_titles(args.candidates.as_deref().unwrap_or("")),
        },
    };
    let config = args.model.config(layers)?;
    let ranker = load_ranker(&config)?;
    let request = ranker.prepare(&input.history, &input.candidates)?;
    if args.show_prompt {
        println!("{}\n", ranker.renderer().tokenizer().decode(&request.prompt.ids)?);
    }
    let start = Instant::now();
    let scores = ranker
        .score_batch(&[ScoreInput {
            request: &request,
            history_cache: None,
            want_history_cache: false,
        }])?
        .remove(0);
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;

    let letters = ranker.verbalizer().letters();
    let ids = ranker.verbalizer().token_ids();
    let mut order: Vec<usize> = (0..scores.logits.len()).collect();
    order.sort_by(|a, b| scores.logits[*b].total_cmp(&scores.logits[*a]));
    let mut rank = vec![0; order.len()];
    for (r, i) in order.iter().enumerate() {
        rank[*i] = r + 1;
    }
    println!("{:>4} {:>6} {:>6} {:>9} {:>7}  title", "rank", "letter", "id", "logit", "prob");
    for &i in &order {
        println!(
            "{:>4} {:>6} {:>6} {:>9.4} {:>7.4}  {}",
            rank[i], letters[i], ids[i], scores.logits[i], scores.probabilities[i], input.candidates[i]
        );
    }
    eprintln!(
        "{} prompt tokens, one forward pass of {} tokens after the cached prefix, {elapsed_ms:.0} ms",
        request.prompt.ids.len(),
        scores.tokens_run
    );

    if let Some(path) = &args.json {
        let value = json!({
            "model": config.model.display().to_string(),
            "template": config.template.name,
            "prompt_tokens": request.prompt.ids.len(),
            "tokens_run": scores.tokens_run,
            "elapsed_ms": elapsed_ms,
            "history": input.history,
            "candidates": (0..scores.logits.len()).map(|i| json!({
                "letter": letters[i],
                "token_id": ids[i],
                "title": input.candidates[i],
                "logit": scores.logits[i],
                "probability": scores.probabilities[i],
                "rank": rank[i],
            })).collect::<Vec<Value>>(),
        });
        super::bench::write_json(path, &value)?;
    }
    Ok(())
}

/// Titles from a "|"-separated list; blank entries are dropped, so "" is no titles.
fn split_titles(list: &str) -> Vec<String> {
    list.split('|').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()
}

#[cfg(test)]
mod tests {
    use super::split_titles;

    #[test]
    fn titles_split_on_bars_and_blank_means_none() {
        assert_eq!(split_titles(" Toy Story (1995) |Heat (1995)|"), ["Toy Story (1995)", "Heat (1995)"]);
        assert!(split_titles("").is_empty());
        assert!(split_titles("  ").is_empty());
    }
}
