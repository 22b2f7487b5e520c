//! `llamarec bench retriever`: training wall time to the best checkpoint (from its report),
//! single-request Retrieve latency in-process and over gRPC (a server started in this process
//! on a free loopback port), and latency against catalog size with random embeddings.

use super::latency::Latencies;
use super::write_json;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset, Split};
use llamarec_common::ranking_metrics::MetricReport;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::RetrieveRequest;
use retriever_service::checkpoint::{read_json, CONFIG_FILE, REPORT_FILE};
use retriever_service::ensemble::{self, EnsembleReport};
use retriever_service::train::sequence_model::SequenceModel;
use retriever_service::service_config::RetrieverServiceConfig;
use retriever_service::{Catalog, CatalogItem, Encoder, LruRecConfig, Retriever, TrainReport};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RetrieverBenchArgs {
    /// Write the results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passes over the test users' histories for the in-process and gRPC series.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Candidates per request.
    #[arg(long, default_value_t = 20)]
    k: u32,
    /// Catalog sizes for the scaling series (random model of the checkpoint's shape, 200-event
    /// history of which the model reads its last `max_len`).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000,1000000")]
    sizes: Vec<usize>,
    /// Requests per catalog size (a quarter of it for catalogs of a million items or more).
    #[arg(long, default_value_t = 200)]
    size_requests: usize,
}

pub async fn run(layers: &ConfigLayers, args: RetrieverBenchArgs) -> Result<()> {
    let config = layers.section::<RetrieverServiceConfig>()?;
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir)?;
    let histories: Vec<Vec<u32>> = dataset.eval_examples(Split::Test).map(|e| e.history.to_vec()).collect();

    let (training, shapes) = training_summary(&config.checkpoint)?;
    eprintln!("training: {}", training);

    // Each series side by side: every Retrieve recomputing the state (a new user, or a history
    // whose 200-event window slid) and returning users (state cache primed with every history).
    let k = args.k as usize;
    let cache_bytes = config.state_cache_bytes.max(1 << 20);
    let cold = in_process_series(&config, &histories, k, args.rounds, 0, Prime::Whole).await?;
    let returning = in_process_series(&config, &histories, k, args.rounds, cache_bytes, Prime::Whole).await?;
    let new_event = in_process_series(&config, &histories, k, args.rounds, cache_bytes, Prime::AllButLast).await?;
    eprintln!(
        "in-process: cold p50 {:.3} / p99 {:.3} ms, returning p50 {:.3} / p99 {:.3} ms, one new event p50 {:.3} / p99 {:.3} ms",
        cold.quantile_ms(0.5),
        cold.quantile_ms(0.99),
        returning.quantile_ms(0.5),
        returning.quantile_ms(0.99),
        new_event.quantile_ms(0.5),
        new_event.quantile_ms(0.99)
    );

    let grpc_cold = grpc_series(RetrieverServiceConfig { state_cache_bytes: 0, ..config.clone() }, &dataset, &histories, &args).await?;
    let grpc_returning = grpc_series(RetrieverServiceConfig { state_cache_bytes: cache_bytes, ..config.clone() }, &dataset, &histories, &args).await?;
    eprintln!("gRPC: cold p50 {:.3} / p99 {:.3} ms, returning p50 {:.3} / p99 {:.3} ms", grpc_cold.quantile_ms(0.5), grpc_cold.quantile_ms(0.99), grpc_returning.quantile_ms(0.5), grpc_returning.quantile_ms(0.99));

    let sizes = args.sizes.clone();
    let size_requests = args.size_requests;
    let scaling = tokio::task::spawn_blocking(move || catalog_series(&shapes, &sizes, size_requests, k)).await??;

    let machine = json!({
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    let result = json!({
        "benchmark": "retriever",
        "dataset": dataset.name,
        "k": k,
        "machine": machine,
        "training": training,
        "retrieve_in_process": cold.summary(),
        "retrieve_in_process_returning_user": returning.summary(),
        "retrieve_in_process_one_new_event": new_event.summary(),
        "retrieve_grpc": grpc_cold.summary(),
        "retrieve_grpc_returning_user": grpc_returning.summary(),
        "catalog_sizes": scaling,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(path) = &args.json {
        write_json(path, &result)?;
    }
    Ok(())
}

/// What the untimed pass before a round puts in the state cache.
#[derive(Clone, Copy, PartialEq)]
enum Prime {
    /// Every history as it will be asked (returning users; with no cache, just a warm-up).
    Whole,
    /// Every history but its last event, before each round: each timed request brings one new
    /// event (LRURec catches up on it; a SASRec member re-encodes; a slid window misses).
    AllButLast,
}

/// One retrieval at a time in this process, with a state cache of `cache_bytes` (0: none),
/// after an untimed pass over every history as `prime` says.
async fn in_process_series(config: &RetrieverServiceConfig, histories: &[Vec<u32>], k: usize, rounds: usize, cache_bytes: u64, prime: Prime) -> Result<Latencies> {
    let checkpoint = config.checkpoint.clone();
    let histories = histories.to_vec();
    tokio::task::spawn_blocking(move || -> Result<Latencies> {
        let fresh = || Retriever::load(&checkpoint).map(|r| r.with_state_cache(cache_bytes));
        let mut retriever = fresh()?;
        let warm = |r: &Retriever| -> Result<()> {
            for h in &histories {
                let primed = if prime == Prime::AllButLast { &h[..h.len() - 1] } else { &h[..] };
                r.retrieve(primed, k, true)?;
            }
            Ok(())
        };
        warm(&retriever)?;
        let mut lat = Latencies::default();
        for round in 0..rounds {
            if prime == Prime::AllButLast && round > 0 {
                // The last round cached every whole history: start again from the prefixes.
                retriever = fresh()?;
                warm(&retriever)?;
            }
            for h in &histories {
                let t = Instant::now();
                std::hint::black_box(retriever.retrieve(h, k, true)?);
                lat.record(t.elapsed());
            }
        }
        Ok(lat)
    })
    .await?
}

/// One Retrieve at a time over loopback gRPC to a server started here on a free port.
async fn grpc_series(mut config: RetrieverServiceConfig, dataset: &Dataset, histories: &[Vec<u32>], args: &RetrieverBenchArgs) -> Result<Latencies> {
    config.metrics_listen = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(retriever_service::server::run_with(config, listener, async move {
        let _ = stopped.await;
    }));
    llamarec_common::serving::wait_serving(&addr.to_string(), Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await?;
    let mut client = RetrieverClient::new(channel);
    let requests: Vec<RetrieveRequest> = histories
        .iter()
        .map(|h| RetrieveRequest {
            history: h.iter().map(|&i| dataset.items[i as usize].id.clone()).collect(),
            k: args.k,
            exclude_history: true,
            ..Default::default()
        })
        .collect();
    // One untimed pass: warms the connection and, when the server caches states, fills it.
    for r in &requests {
        client.retrieve(r.clone()).await?;
    }
    let mut lat = Latencies::default();
    for _ in 0..args.rounds {
        for r in &requests {
            let t = Instant::now();
            match client.retrieve(r.clone()).await {
                Ok(_) => lat.record(t.elapsed()),
                Err(_) => lat.error(),
            }
        }
    }
    let _ = stop.send(());
    server.await??;
    Ok(lat)
}

/// The checkpoint's training figures for the JSON, and the shapes of the models it serves (one,
/// or an ensemble's members).
fn training_summary(checkpoint: &Path) -> Result<(Value, Vec<LruRecConfig>)> {
    if ensemble::is_ensemble(checkpoint) {
        let report: EnsembleReport = read_json(&checkpoint.join(REPORT_FILE)).context("reading the ensemble's report")?;
        let shapes = ensemble::member_dirs(checkpoint)?
            .iter()
            .map(|dir| read_json::<LruRecConfig>(&dir.join(CONFIG_FILE)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut training = quality(&report.validation, &report.test);
        training["ensemble_of"] = json!(shapes.len());
        training["models"] = json!(shapes);
        training["parallel"] = json!(report.parallel);
        training["wall_time_s"] = json!(report.wall_time_s);
        training["checkpoint"] = json!(checkpoint.display().to_string());
        return Ok((training, shapes));
    }
    let report: TrainReport = read_json(&checkpoint.join(REPORT_FILE)).context("reading the checkpoint's training report")?;
    let mut training = quality(&report.validation, &report.test);
    training["checkpoint"] = json!(checkpoint.display().to_string());
    training["model"] = json!(report.config.model);
    training["best_epoch"] = json!(report.best_epoch);
    training["epochs"] = json!(report.epochs);
    training["time_to_best_s"] = json!(report.time_to_best_s);
    training["wall_time_s"] = json!(report.wall_time_s);
    Ok((training, vec![report.config.model]))
}

/// The headline quality figures a checkpoint's report recorded.
fn quality(validation: &MetricReport, test: &MetricReport) -> Value {
    json!({
        "validation_recall_at_10": validation.get(10).recall,
        "test_recall_at_10": test.get(10).recall,
        "test_ndcg_at_10": test.get(10).ndcg,
        "test_recall_at_20": test.get(20).recall,
    })
}

/// An encoder over `n` items with random weights (embeddings N(0, 0.02²) like the
/// initialisation) and the shape of `model` (the served checkpoint's family, width and window),
/// built without materialising a trainable model of that size.
fn random_encoder(model: &LruRecConfig, n: usize, seed: u64) -> Result<Encoder> {
    let small = LruRecConfig { num_items: 16, ..model.clone() };
    let mut tensors = SequenceModel::init(&small, seed, &Device::Cpu)?.tensors();
    let config = LruRecConfig { num_items: n, ..model.clone() };
    tensors.insert("embedding.token.weight".into(), Tensor::randn(0f32, 0.02, (n + 1, config.embed_dim), &Device::Cpu)?);
    tensors.insert("output.bias".into(), Tensor::randn(0f32, 0.02, n + 1, &Device::Cpu)?);
    Ok(Encoder::new(&config, &tensors)?)
}

/// A retriever over `n` items with random models of the served `shapes` (an ensemble of them
/// when there are several).
fn random_retriever(shapes: &[LruRecConfig], n: usize) -> Result<Retriever> {
    let mut members = shapes.iter().zip(7..).map(|(shape, seed)| random_encoder(shape, n, seed)).collect::<Result<Vec<_>>>()?;
    let encoder = if members.len() == 1 { members.remove(0) } else { Encoder::ensemble(members)? };
    let items = (0..=n).map(|i| CatalogItem { id: i.to_string(), title: String::new(), train_count: 0 }).collect();
    Ok(Retriever::new(encoder, Catalog::new(items)))
}

fn catalog_series(shapes: &[LruRecConfig], sizes: &[usize], requests: usize, k: usize) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for &n in sizes {
        let retriever = random_retriever(shapes, n)?;
        let quantized = n >= retriever_service::retriever::QUANTIZED_SCORING_MIN_ITEMS;
        let requests = if n >= 1_000_000 { (requests / 4).max(1) } else { requests };
        let mut variants = vec![(if quantized { "int8 scan + exact f32 re-scoring" } else { "f32" }, retriever)];
        if quantized {
            variants.push(("f32", random_retriever(shapes, n)?.with_quantized_scoring(false)));
        }
        for (scoring, retriever) in variants {
            let history: Vec<u32> = (0..200u32).map(|i| (i.wrapping_mul(7919) as usize % n) as u32 + 1).collect();
            let mut lat = Latencies::default();
            for round in 0..requests + 5 {
                let t = Instant::now();
                std::hint::black_box(retriever.retrieve(&history, k, true)?);
                if round >= 5 {
                    lat.record(t.elapsed());
                }
            }
            eprintln!("catalog {n:>8} items ({scoring}): p50 {:.3} ms, p99 {:.3} ms", lat.quantile_ms(0.5), lat.quantile_ms(0.99));
            out.push(json!({ "items": n, "history": history.len(), "scoring": scoring, "latency": lat.summary() }));
        }
    }
    Ok(out)
}
