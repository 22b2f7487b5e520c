//! `llamarec eval`: Recall/NDCG/MRR at 1, 5, 10, 20 on a split, printed as a table and written
//! as JSON ([`EvalReport`]).

use anyhow::{bail, Context, Result};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset, Split};
use llamarec_common::ranking_metrics::{format_table, EvalReport, TwoStageAccumulator};
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{InlineHistory, RecommendOptions, RecommendRequest};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Which pipeline to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// The retriever alone (LRURec, SASRec or an ensemble), full ranking with history masked.
    Retriever,
    /// Retriever top-N re-ordered by the LLM ranker (fused as configured).
    TwoStage,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Pipeline to evaluate.
    #[arg(long, value_enum)]
    stage: Stage,
    /// Split: validation or test.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Evaluate through a running gateway at this address instead of in-process.
    #[arg(long)]
    via_gateway: Option<String>,
    /// Only the first N users of the split (for quick checks).
    #[arg(long)]
    sample: Option<usize>,
    /// Candidates ranked by the LLM.
    #[arg(long, default_value_t = 20)]
    candidates: u32,
    /// Token and TLS for `--via-gateway`.
    #[command(flatten)]
    access: super::gateway_access::GatewayAccess,
}

pub fn write_report(report: &EvalReport, json: Option<&PathBuf>) -> Result<()> {
    let title = format!("{} · {} · {:?} · {}", report.stage, report.dataset, report.split, report.via);
    println!("{}", format_table(&format!("{title} · all users"), &report.all_users));
    if let Some(valid) = &report.valid_subset {
        println!("{}", format_table(&format!("{title} · valid subset"), valid));
    }
    if let Some(path) = json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(report)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub async fn run(layers: &ConfigLayers, args: EvalArgs) -> Result<()> {
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir)?;
    let report = match (args.via_gateway.clone(), args.stage) {
        (Some(addr), _) => via_gateway(&dataset, &args, &addr).await?,
        (None, Stage::Retriever) => super::eval_retriever::in_process(layers, &dataset, args.split, args.sample)?,
        (None, Stage::TwoStage) => super::eval_two_stage::in_process(layers, &dataset, args.split, args.sample, args.candidates as usize)?,
    };
    write_report(&report, args.json.as_ref())
}

/// Runs each user of the split through the gateway with the split's input history sent inline,
/// so the stored histories are neither needed nor changed. A user whose target is not among the
/// retriever's candidates is a miss whatever the ranker does, so the LLM is only asked for the
/// others: the same metrics at a fraction of the cost.
async fn via_gateway(dataset: &Dataset, args: &EvalArgs, addr: &str) -> Result<EvalReport> {
    let start = Instant::now();
    let bearer = args.access.bearer()?;
    let channel = args.access.endpoint(addr)?.connect().await.with_context(|| format!("connecting to the gateway at {addr}"))?;
    let mut client = GatewayClient::new(channel);
    let examples: Vec<_> = dataset.eval_examples(args.split).take(args.sample.unwrap_or(usize::MAX)).collect();
    let mut acc = TwoStageAccumulator::default();
    let retriever_only = args.stage == Stage::Retriever;
    let k = if retriever_only { 20 } else { args.candidates };
    for (done, ex) in examples.iter().enumerate() {
        let history: Vec<String> = ex.history.iter().map(|&i| dataset.items[i as usize].id.clone()).collect();
        let target = &dataset.items[ex.target as usize].id;
        let call = |skip_ranker: bool| {
            let mut request = tonic::Request::new(RecommendRequest {
                user_id: dataset.users[ex.user].id.clone(),
                k,
                append_events: Vec::new(),
                inline_history: Some(InlineHistory { item_ids: history.clone() }),
                options: Some(RecommendOptions { num_candidates: args.candidates, skip_ranker }),
            });
            request.set_timeout(Duration::from_secs(60));
            if let Some(value) = &bearer {
                request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, value.clone());
            }
            request
        };
        let first = client.recommend(call(true)).await.map_err(|s| anyhow::anyhow!("Recommend: {}: {}", s.code(), s.message()))?.into_inner();
        let in_candidates = first.items.iter().any(|i| &i.item_id == target);
        let response = if retriever_only || !in_candidates {
            first
        } else {
            let ranked = client.recommend(call(false)).await.map_err(|s| anyhow::anyhow!("Recommend: {}: {}", s.code(), s.message()))?.into_inner();
            if ranked.degraded {
                bail!("gateway answered degraded ({}) for user {}: evaluation needs the ranker", ranked.degraded_detail, dataset.users[ex.user].id);
            }
            ranked
        };
        acc.add(response.items.iter().position(|i| &i.item_id == target).map(|p| p + 1));
        if (done + 1) % 50 == 0 || done + 1 == examples.len() {
            eprintln!("eval via gateway: {}/{} users, {:.0} s", done + 1, examples.len(), start.elapsed().as_secs_f64());
        }
    }
    let r = acc.report();
    Ok(EvalReport {
        stage: if retriever_only { "retriever".into() } else { "two-stage".into() },
        split: args.split,
        dataset: dataset.name.clone(),
        via: format!("gateway {addr}"),
        candidates: (!retriever_only).then_some(args.candidates as usize),
        all_users: r.all_users,
        valid_subset: (!retriever_only).then_some(r.valid_subset),
        wall_seconds: start.elapsed().as_secs_f64(),
    })
}
