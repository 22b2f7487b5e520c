//! Access control shared by the three servers: bearer-token authentication (one interceptor,
//! constant-time comparison), the secrets it reads (inline, from a file, from the environment
//! through the layered configuration), and the gateway's TLS settings.
//!
//! Only the services wrapped with [`BearerAuth::wrap`] require a token; grpc.health.v1 is never
//! wrapped, so container probes and `llamarec health` keep working without credentials.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Longest token accepted in configuration, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// A set of accepted bearer tokens. An empty set accepts every request (authentication off).
///
/// Only SHA-256 digests of the tokens are kept; a presented token is hashed and compared with
/// every digest without an early exit, so the time taken does not depend on how much of a token
/// matched, nor on which token matched.
#[derive(Clone)]
pub struct BearerAuth {
    digests: Arc<[[u8; 32]]>,
    /// Who asks, for messages: "gateway", "retriever", "ranker".
    name: &'static str,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth").field("name", &self.name).field("tokens", &self.digests.len()).finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equality of two digests in time independent of their contents.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl BearerAuth {
    /// Accepts every request.
    pub fn open(name: &'static str) -> Self {
        Self { digests: Arc::from(Vec::new()), name }
    }

    /// Accepts requests carrying one of `tokens`; empty strings are ignored, and no tokens at
    /// all means authentication is off.
    pub fn new<T: AsRef<str>>(name: &'static str, tokens: impl IntoIterator<Item = T>) -> Self {
        let digests: Vec<[u8; 32]> =
            tokens.into_iter().filter(|t| !t.as_ref().is_empty()).map(|t| digest(t.as_ref().as_bytes())).collect();
        Self { digests: Arc::from(digests), name }
    }

    /// Whether a token is required.
    pub fn is_enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Checks the `authorization` metadata; the error is UNAUTHENTICATED and says what is
    /// missing or wrong (never which tokens exist).
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        if !self.is_enabled() {
            return Ok(());
        }
        let name = self.name;
        let Some(value) = metadata.get(AUTHORIZATION) else {
            return Err(Status::unauthenticated(format!(
                "{name}: no credentials; send metadata `authorization: Bearer <token>`"
            )));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated(format!("{name}: the authorization metadata must be `Bearer <token>`")))?;
        let presented = digest(token.as_bytes());
        let mut matched = false;
        for d in self.digests.iter() {
            matched |= ct_eq(d, &presented);
        }
        if matched {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("{name}: the bearer token is not valid")))
        }
    }

    /// `service` behind this check (a no-op when authentication is off).
    pub fn wrap<S>(&self, service: S) -> InterceptedService<S, Self> {
        InterceptedService::new(service, self.clone())
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// The `authorization` value for `token`.
pub fn bearer_value(token: &str) -> Result<AsciiMetadataValue, String> {
    format!("Bearer {token}").parse().map_err(|_| "a token must be visible ASCII characters".to_string())
}

/// Sets `authorization: Bearer <token>` on outgoing metadata when a token is given.
pub fn set_bearer(metadata: &mut MetadataMap, token: Option<&str>) {
    if let Some(v) = token.and_then(|t| bearer_value(t).ok()) {
        metadata.insert(AUTHORIZATION, v);
    }
}

/// A token's characters: visible ASCII only (it travels in an HTTP/2 header), no spaces.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("a token must not be empty".into());
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("a token must be at most {MAX_TOKEN_LEN} bytes"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token must be visible ASCII characters without spaces".into());
    }
    // `LLAMAREC_*` environment values that read as numbers or booleans are converted
    // ("0012345" arrives as "12345"), so such a token would silently differ between a side
    // that reads it from the environment and one that reads it from a file.
    if token.parse::<f64>().is_ok() || token.eq_ignore_ascii_case("true") || token.eq_ignore_ascii_case("false") {
        return Err("a token must not read as a number or a boolean (use a random string)".into());
    }
    Ok(())
}

/// Tokens from a file: one per line, surrounding whitespace trimmed, blank lines and lines
/// starting with `#` skipped. A file with no token at all is an error, not "authentication
/// off": a configured `tokens_file` that is empty (a Secret mounted before it was filled, a
/// file with every token commented out) must stop the start rather than open the service.
pub fn read_tokens_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading tokens file {}: {e}", path.display()))?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        check_token(line).map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))?;
        tokens.push(line.to_string());
    }
    if tokens.is_empty() {
        anyhow::bail!(
            "tokens file {} holds no token (only blank lines or `#` comments); refusing to start with authentication off: add a token, or remove `tokens_file`",
            path.display()
        );
    }
    Ok(tokens)
}

/// One secret given inline (`key`) or as a file (`key_file`, its content trimmed, as Kubernetes
/// mounts a Secret). Giving both is an error, as is a file that cannot be read or a value that
/// cannot travel in a header; errors name the key.
pub fn resolve_secret(key: &str, value: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let secret = match (value, file) {
        (Some(_), Some(_)) => anyhow::bail!("`{key}` and `{key}_file` are both set; set one"),
        (Some(v), None) => v.trim().to_string(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("`{key}_file`: reading {}: {e}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    check_token(&secret).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?;
    Ok(Some(secret))
}

/// A model service's access checks from its `auth_token` / `auth_token_file` /
/// `admin_tokens_file` keys (`[retriever]`, `[ranker]`; `name` is the section): the check of
/// every RPC (the shared backend token, which admin tokens also pass, since one `authorization`
/// header carries one token; open without a backend token) and the check of the admin RPCs
/// (admin tokens only; disabled when none are configured).
pub fn model_service_access(
    name: &'static str,
    admin_name: &'static str,
    token: Option<&str>,
    token_file: Option<&Path>,
    admin_tokens_file: Option<&Path>,
) -> anyhow::Result<(BearerAuth, BearerAuth)> {
    let token = resolve_secret(&format!("{name}.auth_token"), token, token_file)?;
    let admin_tokens = match admin_tokens_file {
        Some(path) => read_tokens_file(path).map_err(|e| anyhow::anyhow!("{name}.admin_tokens_file: {e}"))?,
        None => Vec::new(),
    };
    let callers = match token {
        Some(token) => BearerAuth::new(name, std::iter::once(token).chain(admin_tokens.iter().cloned())),
        // No backend token: calls are open, and the admin RPCs alone ask for an admin token.
        None => BearerAuth::open(name),
    };
    Ok((callers, BearerAuth::new(admin_name, admin_tokens)))
}

/// A listen address reachable from other hosts without any token check, or with a token that
/// crosses the network in clear: worth a warning.
pub fn warn_if_exposed(name: &str, listen: std::net::SocketAddr, auth: &BearerAuth, tls: bool) {
    if listen.ip().is_loopback() {
        return;
    }
    if !auth.is_enabled() {
        tracing::warn!(%listen, "{name} listens beyond loopback without `auth_token`: anyone who can reach it can call it");
    } else if !tls {
        tracing::warn!(%listen, "{name} listens beyond loopback without `[{name}.tls]`: its `auth_token` crosses the network in clear");
    }
}

/// Bearer tokens a server accepts (`[gateway.auth]`): inline and/or from a file.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted tokens.
    pub tokens: Vec<String>,
    /// A file of accepted tokens, one per line (`#` comments and blank lines skipped); read at
    /// start.
    pub tokens_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig").field("tokens", &format_args!("[{} redacted]", self.tokens.len())).field("tokens_file", &self.tokens_file).finish()
    }
}

impl AuthConfig {
    /// Checks the inline tokens' characters; returns the offending key and the reason.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        for (i, t) in self.tokens.iter().enumerate() {
            check_token(t).map_err(|e| (format!("{prefix}tokens[{i}]"), e))?;
        }
        Ok(())
    }

    /// The check these settings describe (reads `tokens_file`).
    pub fn build(&self, name: &'static str) -> anyhow::Result<BearerAuth> {
        let mut tokens = self.tokens.clone();
        if let Some(path) = &self.tokens_file {
            tokens.extend(read_tokens_file(path)?);
        }
        Ok(BearerAuth::new(name, tokens))
    }
}

/// A server's TLS settings (`[gateway.tls]`): PEM certificate chain and private key, and
/// optionally a CA whose client certificates are required (mutual TLS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificate(s); when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("TLS {what} {}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        anyhow::bail!("TLS {what} {}: not a PEM file", path.display());
    }
    Ok(bytes)
}

impl TlsConfig {
    /// tonic's server configuration, reading the files (errors name the file).
    pub fn server_config(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        let identity = tonic::transport::Identity::from_pem(read_pem("cert", &self.cert)?, read_pem("key", &self.key)?);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read_pem("client_ca", ca)?));
        }
        Ok(config)
    }
}

/// A client's TLS configuration trusting the PEM CA at `ca` (e.g. a self-signed gateway
/// certificate), checking the server's name against `domain` when given.
pub fn client_tls(ca: &Path, domain: Option<&str>) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(read_pem("CA", ca)?));
    if let Some(d) = domain {
        config = config.domain_name(d);
    }
    Ok(config)
}

/// A client's TLS towards servers it dials (the gateway's `[gateway.backend_tls]`): the CA that
/// signed their certificates and, for servers that require client certificates (their
/// `client_ca`), this client's own certificate and key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// PEM CA certificate(s) the servers' certificates must chain to.
    pub ca: PathBuf,
    /// PEM certificate chain presented to servers that require one (mutual TLS); with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl ClientTlsSettings {
    /// `cert` and `key` come together; returns the offending key and the reason.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err((format!("{prefix}key"), "`cert` is set without `key`; set both or neither".into())),
            (None, Some(_)) => Err((format!("{prefix}cert"), "`key` is set without `cert`; set both or neither".into())),
            _ => Ok(()),
        }
    }

    /// tonic's client configuration, reading the files (errors name the file); the server's
    /// certificate must name `domain` when given, else the host of the address dialled.
    pub fn client_config(&self, domain: Option<&str>) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
        let mut config = client_tls(&self.ca, domain)?;
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(tonic::transport::Identity::from_pem(read_pem("cert", cert)?, read_pem("key", key)?));
            }
            (None, None) => {}
            _ => anyhow::bail!("TLS client `cert` and `key` must be set together"),
        }
        Ok(config)
    }
}

/// An endpoint for `address` (`host:port`): `https` with `tls`, else plaintext `http`.
pub fn endpoint(address: &str, tls: Option<&tonic::transport::ClientTlsConfig>) -> anyhow::Result<tonic::transport::Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| anyhow::anyhow!("`{address}` is not a host:port address: {e}"))?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|e| anyhow::anyhow!("TLS towards {address}: {e}")),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(AUTHORIZATION, value.parse().unwrap());
        m
    }

    #[test]
    fn off_without_tokens() {
        let auth = BearerAuth::new("gateway", [""; 0]);
        assert!(!auth.is_enabled());
        assert!(auth.check(&MetadataMap::new()).is_ok());
        assert!(!BearerAuth::new("gateway", [""]).is_enabled(), "empty strings are no tokens");
    }

    #[test]
    fn accepts_any_configured_token_and_nothing_else() {
        let auth = BearerAuth::new("gateway", ["alpha-1", "beta-2"]);
        assert!(auth.check(&with_auth("Bearer alpha-1")).is_ok());
        assert!(auth.check(&with_auth("Bearer beta-2")).is_ok());
        assert!(auth.check(&with_auth("bearer beta-2")).is_ok(), "the scheme is case-insensitive in practice");
        for bad in ["Bearer alpha-", "Bearer alpha-12", "Bearer ALPHA-1", "Bearer ", "Basic alpha-1", "alpha-1", "Bearer beta-2x"] {
            let e = auth.check(&with_auth(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(e.message().starts_with("gateway: "), "{}", e.message());
        }
        let e = auth.check(&MetadataMap::new()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("authorization: Bearer <token>"), "{}", e.message());
        let e = auth.check(&with_auth("Bearer nope")).unwrap_err();
        assert!(e.message().contains("not valid") && !e.message().contains("alpha"), "{}", e.message());
    }

    #[test]
    fn interceptor_passes_the_request_through() {
        let mut auth = BearerAuth::new("ranker", ["t0k"]);
        let mut ok = Request::new(());
        set_bearer(ok.metadata_mut(), Some("t0k"));
        assert!(Interceptor::call(&mut auth, ok).is_ok());
        let mut none = Request::new(());
        set_bearer(none.metadata_mut(), None);
        assert_eq!(Interceptor::call(&mut auth, none).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn ct_eq_is_equality() {
        let (a, b) = (digest(b"x"), digest(b"y"));
        assert!(ct_eq(&a, &a) && !ct_eq(&a, &b));
    }

    #[test]
    fn tokens_file_and_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# clients\n  first \n\nsecond\n").unwrap();
        assert_eq!(read_tokens_file(&file).unwrap(), ["first", "second"]);
        let auth = AuthConfig { tokens: vec!["inline".into()], tokens_file: Some(file.clone()) }.build("gateway").unwrap();
        for t in ["inline", "first", "second"] {
            assert!(auth.check(&with_auth(&format!("Bearer {t}"))).is_ok(), "{t}");
        }
        std::fs::write(&file, "good\nbad token\n").unwrap();
        let e = read_tokens_file(&file).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");

        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        assert_eq!(resolve_secret("ranker.auth_token", None, Some(&secret)).unwrap().as_deref(), Some("s3cret"));
        assert_eq!(resolve_secret("ranker.auth_token", Some("v"), None).unwrap().as_deref(), Some("v"));
        assert_eq!(resolve_secret("ranker.auth_token", None, None).unwrap(), None);
        let e = resolve_secret("ranker.auth_token", Some("v"), Some(&secret)).unwrap_err().to_string();
        assert!(e.contains("ranker.auth_token") && e.contains("both"), "{e}");
        let e = resolve_secret("ranker.auth_token", None, Some(&dir.path().join("missing"))).unwrap_err().to_string();
        assert!(e.contains("ranker.auth_token_file"), "{e}");
        assert!(AuthConfig { tokens: vec!["a b".into()], tokens_file: None }.validate("auth.").unwrap_err().0 == "auth.tokens[0]");
    }

    #[test]
    fn a_tokens_file_without_tokens_fails_closed() {
        // Comments and blank lines only (or nothing at all): no token, so the start must fail,
        // naming the file, instead of serving with authentication off.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        for text in ["", "\n\n", "# all tokens revoked\n  \n#second\n"] {
            std::fs::write(&file, text).unwrap();
            let e = read_tokens_file(&file).unwrap_err().to_string();
            assert!(e.contains(&file.display().to_string()) && e.contains("no token"), "{text:?}: {e}");
            let config = AuthConfig { tokens: Vec::new(), tokens_file: Some(file.clone()) };
            let e = format!("{:#}", config.build("gateway").unwrap_err());
            assert!(e.contains(&file.display().to_string()), "{e}");
            // Inline tokens beside it do not make an empty file acceptable.
            assert!(AuthConfig { tokens: vec!["inline".into()], ..config }.build("gateway").is_err());
        }
        // No `tokens_file` and no tokens is still the explicit "authentication off".
        assert!(!AuthConfig::default().build("gateway").unwrap().is_enabled());
    }

    #[test]
    fn tokens_from_the_environment_stay_strings() {
        // `LLAMAREC_*` values are parsed (try_parsing): an all-digit token must still arrive as
        // the same string.
        #[derive(Default, serde::Deserialize)]
        #[serde(default)]
        struct Demo {
            auth_token: Option<String>,
            auth: AuthConfig,
        }
        impl crate::config::Section for Demo {
            const NAME: &'static str = "demo";
        }
        let load = |v: &str| -> Demo {
            let env = vec![("LLAMAREC_DEMO__AUTH_TOKEN".to_string(), v.to_string())];
            crate::config::ConfigLayers::load_with_env(None, Some(env)).unwrap().section().unwrap()
        };
        assert_eq!(load("k8s-S3cret_0012345").auth_token.as_deref(), Some("k8s-S3cret_0012345"));
        // What check_token guards against: a numeric value is converted on the way in.
        assert_ne!(load("0012345").auth_token.as_deref(), Some("0012345"));
        for weak in ["0012345", "1e5", "1.50", "TRUE"] {
            assert!(check_token(weak).unwrap_err().contains("number or a boolean"), "{weak}");
        }
        assert!(load("x").auth.tokens.is_empty());
    }

    #[test]
    fn debug_does_not_print_tokens() {
        let c = AuthConfig { tokens: vec!["hunter2".into()], tokens_file: None };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", c.build("gateway").unwrap()).contains("hunter2"));
    }
}
