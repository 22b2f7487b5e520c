//! `llamarec train ranker --export-examples FILE`: instead of training, writes what the trainer
//! would see, as JSONL, so that a peer trainer (bench/peers/ranker_probe.py) trains and validates
//! on exactly the same prompts: the first `max_examples` training examples in the run's order
//! (`epoch_order` with the recipe's seed, each built by the trainer's own `build_prompt_example`
//! from its own random stream, `example_rng`, advanced example by example as `train::train`
//! does) and the validation users with the retriever's candidates and scores.
//!
//! Lines: one `meta` (recipe, letters and their answer token ids), one `train` per example
//! (index, prefix, prompt text and ids, label, letter, answer token, candidates, the random
//! stream's state after it), one
//! `validation` per user (prompt text and ids with the candidates in retriever order, retriever
//! scores, target index or null), and one `end`. A training line's `rng_after` equals
//! `checkpoint/trainer_state.json`'s `rng` of a run checkpointed after as many examples, which
//! checks that the export follows the run.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use ranker_service::train::{build_prompt_example, epoch_order, example_rng, titles_of, RankerTrainConfig, TrainInputs};
use ranker_service::{PromptRenderer, Verbalizer};
use serde_json::json;

/// Writes the export; returns (training examples, validation users) written.
pub fn write(path: &Path, renderer: &PromptRenderer, inputs: &TrainInputs, config: &RankerTrainConfig) -> Result<(usize, usize)> {
    if config.overfit_examples > 0 {
        bail!("--export-examples exports a normal run's examples; drop --overfit");
    }
    let verbalizer = Verbalizer::new(renderer)?;
    let letters = verbalizer.letters();
    let token_ids = verbalizer.token_ids();
    let order = epoch_order(&inputs.sequences, config.min_history, config.seed);
    let total = if config.max_examples == 0 { order.len() } else { config.max_examples.min(order.len()) };
    let max_history = renderer.template().max_history;
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let mut line = |v: serde_json::Value| -> Result<()> {
        serde_json::to_writer(&mut out, &v)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    line(json!({
        "kind": "meta",
        "description": inputs.description,
        "template": renderer.template().name,
        "letters": letters,
        "letter_token_ids": token_ids,
        "seed": config.seed,
        "config": config,
        "epoch_examples": order.len(),
        "training_examples": total,
        "validation_users": inputs.validation.len(),
    }))?;
    let mut rng = example_rng(config.seed);
    let mut prompt_tokens = 0u64;
    for (index, &prefix) in order[..total].iter().enumerate() {
        let (ex, rendered, prompt) = build_prompt_example(inputs, config, renderer, prefix, &mut rng)?;
        let c = titles_of(inputs.titles, &ex.history, &ex.candidates, max_history).1;
        prompt_tokens += prompt.ids.len() as u64;
        line(json!({
            "kind": "train",
            "index": index,
            "user": prefix.user,
            "position": prefix.position,
            "text": rendered.text(),
            "ids": prompt.ids,
            "label": ex.label,
            "letter": letters[ex.label],
            "answer_token": token_ids[ex.label],
            "num_candidates": ex.candidates.len(),
            "candidates": ex.candidates,
            "candidate_titles": c,
            "target": ex.candidates[ex.label],
            "rng_after": rng,
        }))?;
    }
    for (index, case) in inputs.validation.iter().enumerate() {
        let (h, c) = titles_of(inputs.titles, &case.history, &case.candidates, max_history);
        let rendered = renderer.render(&h, &c)?;
        let prompt = renderer.tokenize(&rendered)?;
        line(json!({
            "kind": "validation",
            "index": index,
            "text": rendered.text(),
            "ids": prompt.ids,
            "candidates": case.candidates,
            "candidate_titles": c,
            "retriever_scores": case.retriever_scores,
            "target": case.target,
            "target_index": case.candidates.iter().position(|&x| x == case.target),
        }))?;
    }
    line(json!({
        "kind": "end",
        "training_examples": total,
        "prompt_tokens": prompt_tokens,
        "rng_after_training_examples": rng,
    }))?;
    out.flush()?;
    Ok((total, inputs.validation.len()))
}
