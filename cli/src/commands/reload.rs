//! `llamarec reload retriever|ranker --addr HOST:PORT --admin-token T ...`: asks a running
//! retriever to load a checkpoint, or a running ranker to load a LoRA adapter over its base
//! model, and swap it in without a restart (their Reload RPCs); prints the version served
//! before and after.

use super::admin::AdminConnection;
use anyhow::{Context, Result};
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{ModelVersion, RankerReloadRequest, ReloadRequest};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum ReloadCommand {
    /// Load a retriever checkpoint into a running retriever and swap it in.
    Retriever(ReloadRetrieverArgs),
    /// Load a LoRA adapter into a running ranker (over the base model it holds) and swap it in.
    Ranker(ReloadRankerArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReloadRetrieverArgs {
    #[command(flatten)]
    connection: AdminConnection,
    /// Checkpoint directory, as a path on the retriever's host (relative to its working
    /// directory). Default: its configured `[retriever] checkpoint`, re-read from disk.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Label of the new version (default: `[retriever] model_label` for the configured
    /// checkpoint, else the directory's name).
    #[arg(long)]
    label: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ReloadRankerArgs {
    #[command(flatten)]
    connection: AdminConnection,
    /// PEFT adapter directory, as a path on the ranker's host (relative to its working
    /// directory). Default: its configured `[ranker] adapter`, re-read from disk.
    #[arg(long, conflicts_with = "base_only")]
    adapter: Option<PathBuf>,
    /// Serve the base model without any adapter.
    #[arg(long)]
    base_only: bool,
    /// Label of the new version (default: `[ranker] model_label` for the configured adapter,
    /// else the adapter directory's name, "base" for none).
    #[arg(long)]
    label: Option<String>,
}

pub async fn run(cmd: ReloadCommand) -> Result<()> {
    match cmd {
        ReloadCommand::Retriever(args) => retriever(args).await,
        ReloadCommand::Ranker(args) => ranker(args).await,
    }
}

fn describe(v: &Option<ModelVersion>) -> String {
    match v {
        Some(v) => format!("{} {} ({})", v.name, v.version, if v.label.is_empty() { "no label" } else { &v.label }),
        None => "unknown".into(),
    }
}

fn utf8_path(flag: &str, path: Option<&Path>) -> Result<String> {
    match path {
        Some(p) => Ok(p.to_str().with_context(|| format!("{flag} {} is not UTF-8", p.display()))?.to_string()),
        None => Ok(String::new()),
    }
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("reload refused: {:?}: {}", s.code(), s.message())
}

async fn retriever(args: ReloadRetrieverArgs) -> Result<()> {
    let checkpoint = utf8_path("--checkpoint", args.checkpoint.as_deref())?;
    let request = ReloadRequest { checkpoint, label: args.label.clone().unwrap_or_default() };
    let admin = args.connection.connect("retriever").await?;
    let response = RetrieverClient::new(admin.channel.clone()).reload(admin.request(request)).await.map_err(refused)?.into_inner();
    println!("retriever {} reloaded {} in {} ms", args.connection.addr, response.checkpoint, response.load_ms);
    println!("{} -> {}", describe(&response.previous), describe(&response.current));
    Ok(())
}

async fn ranker(args: ReloadRankerArgs) -> Result<()> {
    let adapter = utf8_path("--adapter", args.adapter.as_deref())?;
    let request = RankerReloadRequest { adapter, label: args.label.clone().unwrap_or_default(), base_only: args.base_only };
    let admin = args.connection.connect("ranker").await?;
    let response = RankerClient::new(admin.channel.clone()).reload(admin.request(request)).await.map_err(refused)?.into_inner();
    let loaded = if response.adapter.is_empty() { "the base model alone".to_string() } else { format!("adapter {}", response.adapter) };
    println!("ranker {} reloaded {loaded} in {} ms", args.connection.addr, response.load_ms);
    println!("{} -> {}", describe(&response.previous), describe(&response.current));
    Ok(())
}
