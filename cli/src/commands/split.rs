//! `llamarec split --addr HOST:PORT --admin-token T [--fraction F] [--canary-weight W]`: reads the
//! canary split of a running gateway (its GetSplit RPC) and, when a new fraction or canary weight
//! is given, sets it (SetSplit), printing the split before and after. The change lasts until the
//! next `llamarec split` or the gateway's restart (which goes back to `[gateway.canary]`); with
//! several gateway replicas, set it on each (or in the config, with a rolling restart).

use anyhow::{Context, Result};
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{CanarySplit, GetSplitRequest, SetSplitRequest};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    /// `host:port` of the gateway (its `[gateway] listen`).
    #[arg(long)]
    addr: String,
    /// New share of users in the canary arm, 0.0 ..= 1.0 (0 turns the canary off). Omitted: unchanged.
    #[arg(long)]
    fraction: Option<f64>,
    /// New fusion weight (`ranker_weight`) of the canary arm, 0.0 ..= 1.0. Omitted: unchanged.
    #[arg(long)]
    canary_weight: Option<f32>,
    /// One of the tokens in the gateway's `[gateway] admin_tokens_file`.
    #[arg(long, env = "LLAMAREC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Connect with TLS, trusting this PEM CA certificate (the gateway's `[gateway.tls]`).
    #[arg(long, env = "LLAMAREC_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Server name the certificate must carry (default: the address's host).
    #[arg(long, env = "LLAMAREC_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

/// One line describing a split.
pub fn describe(split: &Option<CanarySplit>) -> String {
    match split {
        Some(s) => {
            let pods = if s.canary_rankers.is_empty() { "the stable pods".to_string() } else { s.canary_rankers.join(", ") };
            format!(
                "canary fraction {} (ranker_weight {}, rankers {pods}); stable ranker_weight {}",
                s.fraction, s.canary_ranker_weight, s.stable_ranker_weight
            )
        }
        None => "unknown".into(),
    }
}

pub async fn run(args: SplitArgs) -> Result<()> {
    if let Some(f) = args.fraction {
        anyhow::ensure!((0.0..=1.0).contains(&f), "--fraction must be within 0.0 ..= 1.0 (got {f})");
    }
    if let Some(w) = args.canary_weight {
        anyhow::ensure!((0.0..=1.0).contains(&w), "--canary-weight must be within 0.0 ..= 1.0 (got {w})");
    }
    llamarec_common::auth::check_token(&args.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
    let bearer = llamarec_common::auth::bearer_value(&args.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
    let tls = args.tls_ca.as_deref().map(|ca| llamarec_common::auth::client_tls(ca, args.tls_domain.as_deref()).context("--tls-ca")).transpose()?;
    let channel = llamarec_common::auth::endpoint(&args.addr, tls.as_ref())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(args.timeout_s.max(1)))
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {}", args.addr))?;
    let mut client = GatewayClient::new(channel);
    fn authorized<T>(message: T, bearer: &tonic::metadata::AsciiMetadataValue) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, bearer.clone());
        request
    }
    if args.fraction.is_none() && args.canary_weight.is_none() {
        let split = client.get_split(authorized(GetSplitRequest {}, &bearer)).await.map_err(|s| anyhow::anyhow!("GetSplit refused: {:?}: {}", s.code(), s.message()))?;
        println!("gateway {}: {}", args.addr, describe(&split.into_inner().split));
        return Ok(());
    }
    let response = client
        .set_split(authorized(SetSplitRequest { fraction: args.fraction, canary_ranker_weight: args.canary_weight }, &bearer))
        .await
        .map_err(|s| anyhow::anyhow!("SetSplit refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!("gateway {} split set", args.addr);
    println!("before: {}", describe(&response.previous));
    println!("after:  {}", describe(&response.current));
    Ok(())
}
