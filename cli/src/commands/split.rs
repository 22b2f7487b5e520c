//! `llamarec split --addr HOST:PORT --admin-token T [--fraction F] [--canary-weight W]`: reads the
//! canary split of a running gateway (its GetSplit RPC) and, when a new fraction or canary weight
//! is given, sets it (SetSplit), printing the split before and after. The change lasts until the
//! next `llamarec split` or the gateway's restart (which goes back to `[gateway.canary]`); with
//! several gateway replicas, set it on each (or in the config, with a rolling restart).

use super::admin::AdminConnection;
use anyhow::Result;
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{CanarySplit, GetSplitRequest, SetSplitRequest};

#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    #[command(flatten)]
    connection: AdminConnection,
    /// New share of users in the canary arm, 0.0 ..= 1.0 (0 turns the canary off). Omitted: unchanged.
    #[arg(long)]
    fraction: Option<f64>,
    /// New fusion weight (`ranker_weight`) of the canary arm, 0.0 ..= 1.0. Omitted: unchanged.
    #[arg(long)]
    canary_weight: Option<f32>,
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
    let admin = args.connection.connect("gateway").await?;
    let mut client = GatewayClient::new(admin.channel.clone());
    if args.fraction.is_none() && args.canary_weight.is_none() {
        let split = client.get_split(admin.request(GetSplitRequest {})).await.map_err(|s| anyhow::anyhow!("GetSplit refused: {:?}: {}", s.code(), s.message()))?;
        println!("gateway {}: {}", args.connection.addr, describe(&split.into_inner().split));
        return Ok(());
    }
    let response = client
        .set_split(admin.request(SetSplitRequest { fraction: args.fraction, canary_ranker_weight: args.canary_weight }))
        .await
        .map_err(|s| anyhow::anyhow!("SetSplit refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!("gateway {} split set", args.connection.addr);
    println!("before: {}", describe(&response.previous));
    println!("after:  {}", describe(&response.current));
    Ok(())
}
