//! `llamarec eval --stage retriever` in-process: the configured checkpoint, full ranking over
//! all items with the history masked, through the same encoder the service uses.

use anyhow::{bail, Context, Result};
use llamarec_common::config::ConfigLayers;
use llamarec_common::data::{Dataset, Split};
use llamarec_common::ranking_metrics::{EvalReport, MetricAccumulator};
use retriever_service::train::evaluate::{ranks, split_cases, RETRIEVER_KS};
use retriever_service::service_config::RetrieverServiceConfig;
use retriever_service::Retriever;
use std::time::Instant;

/// Evaluates the configured retriever checkpoint on `split` (the first `sample` users if given).
pub fn in_process(layers: &ConfigLayers, dataset: &Dataset, split: Split, sample: Option<usize>) -> Result<EvalReport> {
    let start = Instant::now();
    let retriever = load_for(layers, dataset)?;
    let mut cases = split_cases(dataset, split);
    cases.truncate(sample.unwrap_or(usize::MAX));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut acc = MetricAccumulator::new(&RETRIEVER_KS);
    for rank in ranks(retriever.encoder(), &cases, threads)? {
        acc.add(Some(rank));
    }
    Ok(EvalReport {
        stage: "retriever".into(),
        split,
        dataset: dataset.name.clone(),
        via: "in-process".into(),
        candidates: None,
        all_users: acc.report(),
        valid_subset: None,
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Loads the configured checkpoint and checks that its dense indices are the data set's (same
/// items in the same order), so data set indices can be used with it directly.
pub fn load_for(layers: &ConfigLayers, dataset: &Dataset) -> Result<Retriever> {
    let config = layers.section::<RetrieverServiceConfig>()?;
    let retriever = Retriever::load(&config.checkpoint).with_context(|| format!("loading {}", config.checkpoint.display()))?;
    let catalog = retriever.catalog();
    let same = catalog.num_items() == dataset.num_items()
        && dataset.items.iter().enumerate().skip(1).all(|(i, item)| catalog.item(i as u32).is_some_and(|c| c.id == item.id));
    if !same {
        bail!("checkpoint {} was not trained on data set {} (its item catalog differs)", config.checkpoint.display(), dataset.name);
    }
    Ok(retriever)
}
