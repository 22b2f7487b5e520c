//! `llamarec health ADDR`: exit 0 when the gRPC server at ADDR reports SERVING on
//! grpc.health.v1 (what the Docker HEALTHCHECKs run). With `--tls-ca` it speaks TLS, for a
//! service whose listener has TLS on; health itself never needs a token.

use super::gateway_access::GatewayAccess;
use anyhow::Result;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// `host:port` of any of the three services (or of its `health_listen`).
    addr: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3)]
    timeout_s: u64,
    #[command(flatten)]
    access: GatewayAccess,
}

pub async fn run(args: HealthArgs) -> Result<()> {
    // A probe must answer within its period: one connection attempt may not outlast the timeout.
    let endpoint = args.access.endpoint(&args.addr)?.connect_timeout(Duration::from_secs(args.timeout_s.max(1)));
    llamarec_common::serving::wait_serving_at(&args.addr, endpoint, Duration::from_secs(args.timeout_s)).await.map_err(anyhow::Error::msg)
}
