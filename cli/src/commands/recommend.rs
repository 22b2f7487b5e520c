//! `llamarec recommend`: one Recommend call against a running gateway, printed as a table.

use anyhow::{Context, Result};
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{InlineHistory, RecommendOptions, RecommendRequest};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct RecommendArgs {
    /// The user (for the shipped data set, MovieLens user ids 1..943).
    #[arg(long)]
    user: String,
    /// Number of items.
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:50050")]
    gateway: String,
    /// Candidates the ranker re-orders (0 = the gateway's default).
    #[arg(long, default_value_t = 0)]
    candidates: u32,
    /// Retriever only.
    #[arg(long)]
    skip_ranker: bool,
    /// Recommend from these item ids instead of the stored history.
    #[arg(long, value_delimiter = ',')]
    history: Option<Vec<String>>,
    /// Deadline for the call, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    deadline_ms: u64,
    /// Print the response as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: super::gateway_access::GatewayAccess,
}

/// A channel to the gateway: plaintext, or TLS trusting `--tls-ca`.
async fn connect(args: &RecommendArgs) -> Result<tonic::transport::Channel> {
    let hint = || format!("connecting to the gateway at {} (is `llamarec up` running?)", args.gateway);
    args.access.endpoint(&args.gateway)?.connect().await.with_context(hint)
}

pub async fn run(args: RecommendArgs) -> Result<()> {
    let mut client = GatewayClient::new(connect(&args).await?);
    let mut request = tonic::Request::new(RecommendRequest {
        user_id: args.user.clone(),
        k: args.k,
        append_events: Vec::new(),
        inline_history: args.history.map(|item_ids| InlineHistory { item_ids }),
        options: Some(RecommendOptions { num_candidates: args.candidates, skip_ranker: args.skip_ranker }),
    });
    request.set_timeout(Duration::from_millis(args.deadline_ms));
    args.access.authorize(&mut request)?;
    let response = client.recommend(request).await.map_err(|s| anyhow::anyhow!("Recommend failed: {}: {}", s.code(), s.message()))?.into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&crate::commands::json::recommend_response(&response))?);
        return Ok(());
    }
    let t = response.timings.unwrap_or_default();
    println!(
        "user {} · history {} items · request {} · {:.1} ms (history {:.1}, retrieve {:.1}, rank {:.1})",
        args.user,
        response.history_length,
        response.request_id,
        t.total_us as f64 / 1e3,
        t.history_us as f64 / 1e3,
        t.retrieve_us as f64 / 1e3,
        t.rank_us as f64 / 1e3
    );
    if response.degraded {
        println!("DEGRADED ({}): {}", response.degraded_reason().as_str_name(), response.degraded_detail);
    } else if response.ranker_model.is_none() && !response.items.is_empty() {
        // Not degraded and not ranked: nothing was lost, the ranker was not wanted.
        if args.skip_ranker {
            println!("ranker skipped (--skip-ranker): the retriever's order");
        } else {
            println!("ranker not consulted: the gateway's [gateway] ranker_weight is 0, so the order is the retriever's");
        }
    }
    println!("{:>3}  {:>8}  {:>5}  {:>9}  {:>8}  title", "#", "item", "r.pos", "ranker lp", "final");
    for (i, item) in response.items.iter().enumerate() {
        let lp = item.ranker_log_prob.map_or("-".to_string(), |x| format!("{x:.3}"));
        println!("{:>3}  {:>8}  {:>5}  {:>9}  {:>8.3}  {}", i + 1, item.item_id, item.retriever_rank, lp, item.final_score, item.title);
    }
    Ok(())
}
