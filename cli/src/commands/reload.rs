//! `llamarec reload retriever --addr HOST:PORT --admin-token T [--checkpoint PATH] [--label L]`:
//! asks a running retriever to load a checkpoint and swap it in without a restart (the Reload
//! RPC), and prints the version served before and after.

use anyhow::{Context, Result};
use llamarec_proto::v1::retriever_client::RetrieverClient;
use llamarec_proto::v1::{ModelVersion, ReloadRequest};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum ReloadCommand {
    /// Load a retriever checkpoint into a running retriever and swap it in.
    Retriever(ReloadRetrieverArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReloadRetrieverArgs {
    /// `host:port` of the retriever (its `[retriever] listen`).
    #[arg(long)]
    addr: String,
    /// Checkpoint directory, as a path on the retriever's host (relative to its working
    /// directory). Default: its configured `[retriever] checkpoint`, re-read from disk.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Label of the new version (default: `[retriever] model_label` for the configured
    /// checkpoint, else the directory's name).
    #[arg(long)]
    label: Option<String>,
    /// One of the tokens in the retriever's `[retriever] admin_tokens_file`.
    #[arg(long, env = "LLAMAREC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Connect with TLS, trusting this PEM CA certificate (the retriever's `[retriever.tls]`).
    #[arg(long, env = "LLAMAREC_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Server name the certificate must carry (default: the address's host).
    #[arg(long, env = "LLAMAREC_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Give up after this many seconds (loading and warming up a large checkpoint takes a while).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

pub async fn run(cmd: ReloadCommand) -> Result<()> {
    match cmd {
        ReloadCommand::Retriever(args) => retriever(args).await,
    }
}

fn describe(v: &Option<ModelVersion>) -> String {
    match v {
        Some(v) => format!("{} {} ({})", v.name, v.version, if v.label.is_empty() { "no label" } else { &v.label }),
        None => "unknown".into(),
    }
}

async fn retriever(args: ReloadRetrieverArgs) -> Result<()> {
    llamarec_common::auth::check_token(&args.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
    let bearer = llamarec_common::auth::bearer_value(&args.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
    let tls = args.tls_ca.as_deref().map(|ca| llamarec_common::auth::client_tls(ca, args.tls_domain.as_deref()).context("--tls-ca")).transpose()?;
    let channel = llamarec_common::auth::endpoint(&args.addr, tls.as_ref())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(args.timeout_s.max(1)))
        .connect()
        .await
        .with_context(|| format!("connecting to the retriever at {}", args.addr))?;
    let checkpoint = match &args.checkpoint {
        Some(p) => p.to_str().with_context(|| format!("--checkpoint {} is not UTF-8", p.display()))?.to_string(),
        None => String::new(),
    };
    let mut request = tonic::Request::new(ReloadRequest { checkpoint, label: args.label.clone().unwrap_or_default() });
    request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, bearer);
    let response = RetrieverClient::new(channel)
        .reload(request)
        .await
        .map_err(|s| anyhow::anyhow!("reload refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!("retriever {} reloaded {} in {} ms", args.addr, response.checkpoint, response.load_ms);
    println!("{} -> {}", describe(&response.previous), describe(&response.current));
    Ok(())
}
