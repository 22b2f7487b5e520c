//! What the model services' hot reloads share: why a Reload is refused, with its one mapping to
//! status codes, and the SIGHUP loop that reloads from a re-read configuration.

use std::future::Future;

use tonic::{Code, Status};

/// Why a Reload was refused; the previous model keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No admin token is configured: Reload is refused outright (an unconfigured service cannot
    /// be made to load files).
    #[error(
        "Reload is disabled on this {service}: no admin tokens are configured; set `[{service}] admin_tokens_file` \
         (LLAMAREC_{}__ADMIN_TOKENS_FILE) to a file of tokens, restart it, and send one as `authorization: Bearer <token>`",
        .service.to_uppercase()
    )]
    Disabled {
        /// The configuration section and service: "retriever" or "ranker".
        service: &'static str,
    },
    /// The request itself is wrong (a bad label, a path over the limit).
    #[error("{0}")]
    InvalidArgument(String),
    /// The model cannot replace the served one: it does not load, does not fit, or fails its
    /// warm-up.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The load task died.
    #[error("reload failed: {0}")]
    Internal(String),
}

impl From<ReloadError> for Status {
    fn from(e: ReloadError) -> Self {
        let code = match &e {
            ReloadError::Disabled { .. } => Code::PermissionDenied,
            ReloadError::InvalidArgument(_) => Code::InvalidArgument,
            ReloadError::FailedPrecondition(_) => Code::FailedPrecondition,
            ReloadError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// Installs the SIGHUP handler and spawns a task that, on every SIGHUP, reads the configuration
/// again (`reread`) and hands it to `reload`. A configuration that cannot be read, or a reload
/// that is refused, is logged and the current model keeps serving. Install it before reporting
/// SERVING: from then on SIGHUP reloads instead of ending the process. Abort the task to stop.
pub fn spawn_sighup_reloader<C, R, Fut>(
    service: &'static str,
    reread: impl Fn() -> anyhow::Result<C> + Send + 'static,
    reload: R,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    C: Send + 'static,
    R: Fn(C) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), ReloadError>> + Send,
{
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("installing the {service}'s SIGHUP handler: {e}"))?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let config = match reread() {
                Ok(config) => config,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "SIGHUP: the configuration could not be re-read; the current model keeps serving");
                    continue;
                }
            };
            if let Err(e) = reload(config).await {
                tracing::warn!(error = %e, "SIGHUP: reload refused");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_errors_keep_their_codes_and_messages() {
        let cases: Vec<(Status, Code, &str)> = vec![
            (
                ReloadError::Disabled { service: "retriever" }.into(),
                Code::PermissionDenied,
                "Reload is disabled on this retriever: no admin tokens are configured; set `[retriever] admin_tokens_file` \
                 (LLAMAREC_RETRIEVER__ADMIN_TOKENS_FILE) to a file of tokens, restart it, and send one as `authorization: Bearer <token>`",
            ),
            (ReloadError::InvalidArgument("label: empty".into()).into(), Code::InvalidArgument, "label: empty"),
            (ReloadError::FailedPrecondition("refused".into()).into(), Code::FailedPrecondition, "refused"),
            (ReloadError::Internal("died".into()).into(), Code::Internal, "reload failed: died"),
        ];
        for (status, code, message) in cases {
            assert_eq!((status.code(), status.message()), (code, message));
        }
        let ranker: Status = ReloadError::Disabled { service: "ranker" }.into();
        assert!(ranker.message().contains("`[ranker] admin_tokens_file` (LLAMAREC_RANKER__ADMIN_TOKENS_FILE)"), "{}", ranker.message());
    }
}
