//! `llamarec score-prompt`: one raw prompt, one forward pass, the last-position logits of the
//! index letters "A".."T" (the verbalizer's token ids), to compare with another engine (e.g.
//! llama.cpp's `llama-cli --logits` or transformers) on exactly the same token sequence.

use super::rank::{load_ranker, ModelArgs};
use anyhow::{bail, Context, Result};
use llamarec_common::config::ConfigLayers;
use ranker_service::{Positions, Ranker, TokenBatch};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ScorePromptArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt, used byte for byte (a trailing newline is part of it); special tokens such
    /// as `<|im_start|>` written in it are parsed as single tokens, nothing is prepended.
    #[arg(long)]
    prompt: PathBuf,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also report this many most likely next tokens over the whole vocabulary.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

/// One index letter's score.
#[derive(Debug, Serialize)]
pub struct LetterLogit {
    /// The letter, e.g. "A".
    pub letter: String,
    /// The verbalizer's token id of the letter.
    pub token_id: u32,
    /// Raw logit at the prompt's last position.
    pub logit: f32,
    /// Probability under a softmax over the whole vocabulary.
    pub vocab_probability: f32,
}

/// One of the most likely next tokens.
#[derive(Debug, Serialize)]
pub struct TopToken {
    /// Token id.
    pub token_id: u32,
    /// The token's text.
    pub text: String,
    /// Raw logit.
    pub logit: f32,
}

/// Everything score-prompt reports.
#[derive(Debug, Serialize)]
pub struct PromptScores {
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// The prompt's token ids, to check that both engines tokenized it the same way.
    pub token_ids: Vec<u32>,
    /// The letters in verbalizer order.
    pub letters: Vec<LetterLogit>,
    /// Total vocabulary probability of the letters.
    pub letter_mass: f32,
    /// The most likely next tokens over the whole vocabulary.
    pub top: Vec<TopToken>,
}

/// Runs `prompt` from scratch (no cached prefix) in one forward pass and reads the
/// last-position logits of the verbalizer's letter tokens.
pub fn score_prompt(ranker: &Ranker, prompt: &str, top: usize) -> Result<PromptScores> {
    let tokenizer = ranker.renderer().tokenizer();
    let ids = tokenizer.encode(prompt)?;
    let max = ranker.model().config().max_seq_len;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if ids.len() > max {
        bail!("the prompt has {} tokens, more than the model's context of {max}", ids.len());
    }
    let model = ranker.model();
    let batch = TokenBatch::left_padded(&[&ids], model.device())?;
    let out = model.forward(&batch, None, None, Positions::Last)?;
    let logits: Vec<f32> = model.full_logits(&out.last_hidden()?)?.squeeze(0)?.to_vec1()?;
    let max_logit = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let norm: f32 = logits.iter().map(|l| (l - max_logit).exp()).sum();
    let prob = |l: f32| (l - max_logit).exp() / norm;

    let verbalizer = ranker.verbalizer();
    let letters: Vec<LetterLogit> = verbalizer
        .letters()
        .iter()
        .zip(verbalizer.token_ids())
        .map(|(letter, &id)| LetterLogit {
            letter: letter.clone(),
            token_id: id,
            logit: logits[id as usize],
            vocab_probability: prob(logits[id as usize]),
        })
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    let top = order
        .iter()
        .take(top)
        .map(|&i| {
            Ok(TopToken {
                token_id: i as u32,
                text: tokenizer.decode(&[i as u32])?,
                logit: logits[i],
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PromptScores {
        prompt_tokens: ids.len(),
        letter_mass: letters.iter().map(|l| l.vocab_probability).sum(),
        letters,
        top,
        token_ids: ids,
    })
}

pub fn run(layers: &ConfigLayers, args: ScorePromptArgs) -> Result<()> {
    let prompt = std::fs::read_to_string(&args.prompt).with_context(|| format!("reading {}", args.prompt.display()))?;
    let ranker = load_ranker(&args.model.config(layers)?)?;
    let scores = score_prompt(&ranker, &prompt, args.top)?;
    println!(
        "{} prompt tokens; letters hold {:.3} of the next-token probability",
        scores.prompt_tokens, scores.letter_mass
    );
    println!("{:>6} {:>6} {:>9} {:>8}", "letter", "id", "logit", "p(vocab)");
    for l in &scores.letters {
        println!("{:>6} {:>6} {:>9.4} {:>8.4}", l.letter, l.token_id, l.logit, l.vocab_probability);
    }
    println!("most likely next tokens:");
    for t in &scores.top {
        println!("{:>6} {:>9.4}  {:?}", t.token_id, t.logit, t.text);
    }
    if let Some(path) = &args.json {
        super::bench::write_json(path, &serde_json::to_value(&scores)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::score_prompt;
    use ranker_service::sample::movielens_request;
    use ranker_service::{PromptTemplate, Ranker, RankerModelConfig, WeightPrecision};
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// The ranker on the shipped model (`llamarec fetch`), loaded once.
    fn ranker() -> &'static Ranker {
        static RANKER: OnceLock<Ranker> = OnceLock::new();
        RANKER.get_or_init(|| {
            let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../assets")
                .join(llamarec_common::assets::SHIPPED_GGUF);
            assert!(model.exists(), "{} is missing: run `llamarec fetch`", model.display());
            let config = RankerModelConfig {
                model,
                tokenizer: None,
                precision: WeightPrecision::F32,
                template: PromptTemplate::alpaca(),
            };
            super::load_ranker(&config).unwrap()
        })
    }

    #[test]
    fn letter_ids_are_the_verbalizers_single_letter_tokens() {
        let ranker = ranker();
        let scores = score_prompt(ranker, "### Response:\n", 3).unwrap();
        let ids: Vec<u32> = scores.letters.iter().map(|l| l.token_id).collect();
        assert_eq!(ids, ranker.verbalizer().token_ids());
        assert_eq!(ids, (49..69).collect::<Vec<u32>>());
        let tokenizer = ranker.renderer().tokenizer();
        for l in &scores.letters {
            assert_eq!(tokenizer.decode(&[l.token_id]).unwrap(), l.letter);
        }
        assert_eq!(scores.top.len(), 3);
        assert!(scores.top[0].logit >= scores.top[2].logit);
    }

    #[test]
    fn raw_rendered_prompt_scores_like_the_ranker() {
        let ranker = ranker();
        let (history, candidates) = movielens_request();
        let request = ranker.prepare(&history, &candidates).unwrap();
        let text = ranker.renderer().render(&history, &candidates).unwrap().text();
        let raw = score_prompt(ranker, &text, 0).unwrap();
        assert_eq!(raw.token_ids, request.prompt.ids);
        let served = ranker.score(&history, &candidates).unwrap();
        for (l, want) in raw.letters.iter().zip(&served.logits) {
            assert!((l.logit - want).abs() < 1e-3, "{}: raw {} vs ranker {want}", l.letter, l.logit);
        }
    }
}
