//! The connection of the admin commands (`llamarec reload`, `llamarec split`): a service's
//! address, an admin token from its `admin_tokens_file`, TLS flags, and every request sent with
//! the token.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

/// Where the service is and how to reach it as an admin.
#[derive(Debug, clap::Args)]
pub struct AdminConnection {
    /// `host:port` of the service (its `listen`).
    #[arg(long)]
    pub addr: String,
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

/// A connected admin channel.
pub struct AdminChannel {
    /// The channel, for the service's generated client.
    pub channel: Channel,
    bearer: AsciiMetadataValue,
}

impl AdminConnection {
    /// Checks the token and connects to `service` (named in errors).
    pub async fn connect(&self, service: &str) -> Result<AdminChannel> {
        llamarec_common::auth::check_token(&self.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
        let bearer = llamarec_common::auth::bearer_value(&self.admin_token).map_err(|e| anyhow::anyhow!("--admin-token: {e}"))?;
        let tls = self.tls_ca.as_deref().map(|ca| llamarec_common::auth::client_tls(ca, self.tls_domain.as_deref()).context("--tls-ca")).transpose()?;
        let channel = llamarec_common::auth::endpoint(&self.addr, tls.as_ref())?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(self.timeout_s.max(1)))
            .connect()
            .await
            .with_context(|| format!("connecting to the {service} at {}", self.addr))?;
        Ok(AdminChannel { channel, bearer })
    }
}

impl AdminChannel {
    /// `message` with the admin token in its `authorization` metadata.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, self.bearer.clone());
        request
    }
}
