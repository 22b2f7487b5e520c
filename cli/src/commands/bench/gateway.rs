//! `llamarec bench gateway`: against a running cluster,
//! 1. the gateway's overhead: Recommend (with the ranker) and the same Rank call (same 20
//!    candidates, same history titles, history already cached in the ranker) sent to the ranker
//!    directly, interleaved one at a time, so both see the same machine state;
//! 2. retriever-only Recommend (skip ranker) one at a time: the same gateway work without the
//!    ranker and its ±100 ms jitter (history read, the Retrieve hop, merge, and one client hop in
//!    place of the gateway→ranker hop), so thousands of samples resolve a 1 ms overhead;
//! 3. retriever-only Recommend throughput with concurrent closed-loop clients.

use super::latency::Latencies;
use super::write_json;
use anyhow::{Context, Result};
use gateway::config::GatewayConfig;
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset};
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::{GetHistoryRequest, RankRequest, RecommendOptions, RecommendRequest};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct GatewayBenchArgs {
    /// Write the results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Interleaved Recommend/Rank pairs for the overhead measurement.
    #[arg(long, default_value_t = 30)]
    overhead_requests: usize,
    /// Retriever-only Recommend calls sent one at a time (0: skip).
    #[arg(long, default_value_t = 2000)]
    sequential: usize,
    /// Concurrent clients for the throughput measurement.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Duration of the throughput measurement, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Token and TLS towards the gateway (the ranker is dialled as the local config says:
    /// plaintext, `[gateway] backend_token`).
    #[command(flatten)]
    access: crate::commands::gateway_access::GatewayAccess,
}

async fn connect(endpoint: tonic::transport::Endpoint, addr: &str) -> Result<Channel> {
    endpoint.tcp_nodelay(true).connect().await.with_context(|| format!("connecting to {addr}"))
}

/// A Recommend request, carrying `bearer` when the gateway wants a token.
fn recommend(user: &str, skip_ranker: bool, bearer: &Option<AsciiMetadataValue>) -> tonic::Request<RecommendRequest> {
    let mut request = tonic::Request::new(RecommendRequest {
        user_id: user.into(),
        k: 10,
        options: Some(RecommendOptions { num_candidates: 20, skip_ranker }),
        ..Default::default()
    });
    if let Some(value) = bearer {
        request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, value.clone());
    }
    request
}

pub async fn run(layers: &ConfigLayers, args: GatewayBenchArgs) -> Result<()> {
    let config = layers.section::<GatewayConfig>()?;
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir)?;
    let users: Vec<String> = dataset.users.iter().map(|u| u.id.clone()).collect();
    let titles: std::collections::HashMap<&str, &str> = dataset.items.iter().map(|i| (i.id.as_str(), i.title.as_str())).collect();
    let gateway_addr = config.listen.to_string();
    let ranker_addr = config.rankers.addresses.first().cloned().context("gateway.rankers.addresses is empty")?;
    let bearer = args.access.bearer()?;
    let gateway_channel = connect(args.access.endpoint(&gateway_addr)?, &gateway_addr).await?;
    // The ranker as the gateway dials it: its backend token and backend TLS.
    let backend_token =
        llamarec_common::auth::resolve_secret("gateway.backend_token", config.backend_token.as_deref(), config.backend_token_file.as_deref())?;
    let ranker_tls = config.backend_tls.as_ref().map(|b| b.settings().client_config(b.ranker_domain.as_deref())).transpose()?;
    let rank_request = |rank: RankRequest| {
        let mut request = tonic::Request::new(rank);
        llamarec_common::auth::set_bearer(request.metadata_mut(), backend_token.as_deref());
        request
    };
    let mut gateway = GatewayClient::new(gateway_channel.clone());

    // 1. Overhead, one request at a time.
    let mut via_gateway = Latencies::default();
    let mut direct = Latencies::default();
    // Per Recommend: its latency at the client minus the Rank call's latency as the gateway saw
    // it (StageTimings.rank_us): everything the gateway adds, free of the ranker's jitter.
    let mut added = Latencies::default();
    let mut ranker = match args.overhead_requests {
        0 => None,
        _ => Some(RankerClient::new(connect(llamarec_common::auth::endpoint(&ranker_addr, ranker_tls.as_ref())?, &ranker_addr).await?)),
    };
    for (i, user) in users.iter().cycle().take(args.overhead_requests).enumerate() {
        let ranker = ranker.as_mut().expect("connected when overhead requests are asked for");
        // The same prompt the gateway would send: its candidates, the user's last 20 titles.
        let mut history_request = tonic::Request::new(GetHistoryRequest { user_id: user.clone(), limit: 20 });
        if let Some(value) = &bearer {
            history_request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, value.clone());
        }
        let history = gateway.get_history(history_request).await?.into_inner().events;
        let mut candidates_request = recommend(user, true, &bearer);
        candidates_request.get_mut().k = 20;
        let skip = gateway.recommend(candidates_request).await?.into_inner();
        let candidates = skip.items.iter().map(|i| i.title.clone()).collect::<Vec<_>>();
        let rank = RankRequest {
            history_titles: history.iter().filter_map(|e| titles.get(e.item_id.as_str()).map(|t| t.to_string())).collect(),
            candidate_titles: candidates,
        };
        // Untimed: puts the user's history in the ranker's cache, so both timed calls below
        // are returning-user calls doing the same work.
        ranker.rank(rank_request(rank.clone())).await?;
        let t = Instant::now();
        let r = gateway.recommend(recommend(user, false, &bearer)).await?.into_inner();
        let elapsed = t.elapsed();
        via_gateway.record(elapsed);
        let rank_us = r.timings.as_ref().map_or(0, |t| t.rank_us);
        added.record(elapsed.saturating_sub(Duration::from_micros(rank_us)));
        anyhow::ensure!(!r.degraded, "Recommend was degraded ({}); the benchmark needs a healthy ranker", r.degraded_detail);
        let t = Instant::now();
        ranker.rank(rank_request(rank)).await?;
        direct.record(t.elapsed());
        eprintln!("overhead pair {}/{}", i + 1, args.overhead_requests);
    }

    // 2. Retriever-only, one at a time (warmed by one pass over the users first).
    let mut sequential = Latencies::default();
    let warm_up = users.len().min(args.sequential);
    for (i, user) in users.iter().cycle().take(warm_up + args.sequential).enumerate() {
        let t = Instant::now();
        gateway.recommend(recommend(user, true, &bearer)).await?;
        if i >= warm_up {
            sequential.record(t.elapsed());
        }
    }

    // 3. Retriever-only throughput, closed loop.
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let mut client = GatewayClient::new(gateway_channel.clone());
            let (users, bearer) = (users.clone(), bearer.clone());
            tokio::spawn(async move {
                let mut lat = Latencies::default();
                let mut i = w;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match client.recommend(recommend(&users[i % users.len()], true, &bearer)).await {
                        Ok(_) => lat.record(t.elapsed()),
                        Err(_) => lat.error(),
                    }
                    i += args.concurrency;
                }
                lat
            })
        })
        .collect();
    let mut retriever_only = Latencies::default();
    for w in workers {
        retriever_only.merge(&w.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rps = retriever_only.count() as f64 / elapsed;

    let overhead_p99 = via_gateway.quantile_ms(0.99) - direct.quantile_ms(0.99);
    let overhead_p50 = via_gateway.quantile_ms(0.50) - direct.quantile_ms(0.50);
    let report = json!({
        "bench": "gateway",
        "gateway": gateway_addr,
        "ranker": ranker_addr,
        "recommend_with_ranker": via_gateway.summary(),
        "rank_direct": direct.summary(),
        "gateway_overhead_p50_ms": overhead_p50,
        "gateway_overhead_p99_ms": overhead_p99,
        "gateway_added_per_request": added.summary(),
        "retriever_only_sequential": sequential.summary(),
        "retriever_only": {
            "concurrency": args.concurrency,
            "seconds": elapsed,
            "requests_per_second": rps,
            "latency": retriever_only.summary(),
        },
    });
    println!(
        "Recommend p50/p99 {:.1}/{:.1} ms · Rank direct p50/p99 {:.1}/{:.1} ms · gateway overhead p50 {:.2} ms, p99 {:.2} ms",
        via_gateway.quantile_ms(0.5),
        via_gateway.quantile_ms(0.99),
        direct.quantile_ms(0.5),
        direct.quantile_ms(0.99),
        overhead_p50,
        overhead_p99
    );
    println!(
        "gateway's own time per Recommend (client latency minus the Rank call it made): p50 {:.3} ms, p99 {:.3} ms",
        added.quantile_ms(0.5),
        added.quantile_ms(0.99)
    );
    println!(
        "retriever-only Recommend one at a time ({} calls): p50 {:.3} ms · p99 {:.3} ms",
        sequential.count(),
        sequential.quantile_ms(0.5),
        sequential.quantile_ms(0.99)
    );
    println!(
        "retriever-only Recommend: {rps:.0} req/s at concurrency {} · p50 {:.2} ms · p99 {:.2} ms",
        args.concurrency,
        retriever_only.quantile_ms(0.5),
        retriever_only.quantile_ms(0.99)
    );
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}
