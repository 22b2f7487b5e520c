//! The options of every command that dials a gateway (`recommend`, `eval --via-gateway`,
//! `replay`, `bench gateway`, `bench replay`, `health`): a bearer token for `[gateway.auth]`
//! and TLS trusting a CA for `[gateway.tls]`. One struct, flattened into each command, so the
//! flags, their environment variables and their checks are the same everywhere.

use anyhow::{Context, Result};
use std::path::PathBuf;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{ClientTlsConfig, Endpoint};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct GatewayAccess {
    /// Bearer token for a gateway with `[gateway.auth]` (sent as `authorization: Bearer ...`).
    #[arg(long, env = "LLAMAREC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Connect with TLS, trusting this PEM CA certificate (the gateway's `[gateway.tls]`; for
    /// `health`, that of whichever service is asked).
    #[arg(long, env = "LLAMAREC_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Server name the certificate must carry (default: the address's host).
    #[arg(long, env = "LLAMAREC_TLS_DOMAIN", requires = "tls_ca")]
    pub tls_domain: Option<String>,
}

impl GatewayAccess {
    /// TLS towards the server, when `--tls-ca` is given (reads the CA file).
    pub fn tls(&self) -> Result<Option<ClientTlsConfig>> {
        self.tls_ca.as_deref().map(|ca| llamarec_common::auth::client_tls(ca, self.tls_domain.as_deref()).context("--tls-ca")).transpose()
    }

    /// An endpoint for `addr` (`host:port`): `https` trusting `--tls-ca`, else plaintext.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint> {
        llamarec_common::auth::endpoint(addr, self.tls()?.as_ref())
    }

    /// The `authorization` value for `--token`, checked once before any call is made.
    pub fn bearer(&self) -> Result<Option<AsciiMetadataValue>> {
        let Some(token) = self.token.as_deref() else { return Ok(None) };
        // The servers accept only tokens that pass this check, so a token that fails it could
        // never authenticate: say so rather than send it.
        llamarec_common::auth::check_token(token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
        llamarec_common::auth::bearer_value(token).map(Some).map_err(|e| anyhow::anyhow!("--token: {e}"))
    }

    /// Adds the token (if any) to `request`.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<()> {
        if let Some(value) = self.bearer()? {
            request.metadata_mut().insert(llamarec_common::auth::AUTHORIZATION, value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Demo {
        #[command(flatten)]
        access: GatewayAccess,
    }

    #[test]
    fn plaintext_by_default_and_https_with_a_ca() {
        let d = Demo::try_parse_from(["x"]).unwrap();
        if std::env::var_os("LLAMAREC_TLS_CA").is_none() {
            assert!(d.access.tls().unwrap().is_none());
            assert_eq!(d.access.endpoint("127.0.0.1:1").unwrap().uri().scheme_str(), Some("http"));
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let d = Demo::try_parse_from(["x", "--tls-ca", ca.to_str().unwrap()]).unwrap();
        let e = format!("{:#}", d.access.endpoint("127.0.0.1:1").unwrap_err());
        assert!(e.contains("--tls-ca") && e.contains("not a PEM file"), "{e}");
    }

    #[test]
    fn a_domain_needs_a_ca_and_a_bad_token_is_named() {
        if std::env::var_os("LLAMAREC_TLS_CA").is_none() {
            assert!(Demo::try_parse_from(["x", "--tls-domain", "gateway"]).is_err());
        }
        let d = Demo::try_parse_from(["x", "--token", "two words"]).unwrap();
        assert!(d.access.bearer().unwrap_err().to_string().contains("--token"));
        let d = Demo::try_parse_from(["x", "--token", "abc-123"]).unwrap();
        let mut r = tonic::Request::new(());
        d.access.authorize(&mut r).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer abc-123");
    }
}
