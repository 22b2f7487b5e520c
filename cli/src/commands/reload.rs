//! `llamarec reload retriever|ranker --addr HOST:PORT --admin-token T ...`: asks a running
//! retriever to load a checkpoint, or a running ranker to load a LoRA adapter over its base
//! model, and swap it in without a restart (their Reload RPCs); prints the version served
//! before and after.

use anyhow::{Context, Result};
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{ModelVersion, RankerReloadRequest, ReloadRequest};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug, clap::Subcommand)]
pub enum ReloadCommand {
    /// Load a retriever checkpoint into a running retriever and swap it in.
    Retriever(ReloadRetrieverArgs),
    /// Load a LoRA adapter into a running ranker (over the base model it holds) and swap it in.
    Ranker(ReloadRankerArgs),
}

/// Where the service is and how to reach it as an admin.
#[derive(Debug, clap::Args)]
pub struct AdminConnection {
    /// `host:port` of the service (its `listen`).
    #[arg(long)]
    addr: String,
    /// One of the tokens in the service's `admin_tokens_file`.
    #[arg(long, env = "LLAMAREC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Connect with TLS, trusting this PEM CA certificate (the service's `tls` section).
    #[arg(long, env = "LLAMAREC_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Server name the certificate must carry (default: the address's host).
    #[arg(long, env = "LLAMAREC_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Give up after this many seconds (loading and warming up a large model takes a while).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
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

impl AdminConnection {
    /// A channel to the service, and `request` with the admin token attached.
    async fn connect<T>(&self, service: &str, request: T) -> Result<(Channel, tonic::Request<T>)> {
        llamarec_common::auth::check_token(&self.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
        let bearer = llamarec_common::auth::bearer_value(&self.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
        let tls = self.tls_ca.as_deref().map(|ca| llamarec_common::auth::client_tls(ca, self.tls_domain.as_deref()).context("--tls-ca")).transpose()?;
        let channel = llamarec_common::auth::endpoint(&self.addr, tls.as_ref())?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(self.timeout_s.max(1)))
            .connect()
            .await
            .with_context(|| format!("connecting to the {service} at {}", self.addr))?;
        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, bearer);
        Ok((channel, request))
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
    let (channel, request) = args.connection.connect("retriever", request).await?;
    let response = RetrieverClient::new(channel).reload(request).await.map_err(refused)?.into_inner();
    println!("retriever {} reloaded {} in {} ms", args.connection.addr, response.checkpoint, response.load_ms);
    println!("{} -> {}", describe(&response.previous), describe(&response.current));
    Ok(())
}

async fn ranker(args: ReloadRankerArgs) -> Result<()> {
    let adapter = utf8_path("--adapter", args.adapter.as_deref())?;
    let request = RankerReloadRequest { adapter, label: args.label.clone().unwrap_or_default(), base_only: args.base_only };
    let (channel, request) = args.connection.connect("ranker", request).await?;
    let response = RankerClient::new(channel).reload(request).await.map_err(refused)?.into_inner();
    let loaded = if response.adapter.is_empty() { "the base model alone".to_string() } else { format!("adapter {}", response.adapter) };
    println!("ranker {} reloaded {loaded} in {} ms", args.connection.addr, response.load_ms);
    println!("{} -> {}", describe(&response.previous), describe(&response.current));
    Ok(())
}
