//! Builds the gateway from configuration and serves it.

use crate::canary::Canary;
use crate::catalog::Catalog;
use crate::config::{GatewayConfig, StoreConfig};
use crate::history::{AnyStore, EmbeddedStore, HistoryStore, RedisStore, StoredEvent, UserHistoryCache};
use crate::ranker_client::pool::RankerPool;
use crate::ranker_client::Ranker;
use crate::retriever_client::batching::RetrieverCalls;
use crate::retriever_client::Retriever;
use crate::service::GatewayService;
use anyhow::Context;
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset};
use llamarec_common::{auth, serving};
use llamarec_proto::v1::gateway_server::GatewayServer;
use llamarec_proto::v1::retriever_client::RetrieverClient;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

/// The configured store, keeping the newest `max_history` events per user.
async fn open_store(config: &StoreConfig, max_history: usize) -> anyhow::Result<AnyStore> {
    Ok(match config {
        StoreConfig::Embedded { path } => {
            AnyStore::Embedded(EmbeddedStore::open(path).with_context(|| format!("opening {}", path.display()))?.with_max_history(max_history))
        }
        StoreConfig::Redis { url, prefix, password_file } => {
            let password = match password_file {
                Some(path) => Some(redis_password(path)?),
                None => None,
            };
            AnyStore::Redis(
                RedisStore::connect_with_password(url, prefix, password.as_deref())
                    .await
                    .with_context(|| format!("connecting to {url}"))?
                    .with_max_history(max_history),
            )
        }
    })
}

/// The Redis password in `path` (trimmed, as Kubernetes mounts a Secret); an empty file is an
/// error rather than "no password", for the same reason an empty tokens file is.
fn redis_password(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("gateway.store.password_file: reading {}", path.display()))?;
    let password = text.trim();
    if password.is_empty() {
        anyhow::bail!("gateway.store.password_file: {} is empty; refusing to connect to Redis without the password", path.display());
    }
    Ok(password.to_string())
}

/// The data set's train + validation items per user: what a user "has seen" before the test
/// item, so Recommend on a seeded store predicts the held-out test item.
fn seed_histories(dataset: &Dataset) -> Vec<(String, Vec<StoredEvent>)> {
    dataset
        .users
        .iter()
        .map(|u| {
            let n = u.items.len().saturating_sub(1);
            let events = u.items[..n]
                .iter()
                .zip(&u.timestamps)
                .map(|(&i, &ts)| StoredEvent { item_id: dataset.items[i as usize].id.clone(), timestamp_ms: ts * 1000 })
                .collect();
            (u.id.clone(), events)
        })
        .collect()
}

/// The server's access checks: every RPC's (`[gateway.auth]`'s tokens, which admin tokens also
/// pass, since one `authorization` header carries one token) and the admin RPCs' (admin tokens
/// only; none configured: the admin RPCs are refused).
fn access(config: &GatewayConfig) -> anyhow::Result<(auth::BearerAuth, auth::BearerAuth)> {
    let mut tokens = config.auth.tokens.clone();
    if let Some(path) = &config.auth.tokens_file {
        tokens.extend(auth::read_tokens_file(path).context("gateway.auth")?);
    }
    let admin_tokens = match &config.admin_tokens_file {
        Some(path) => auth::read_tokens_file(path).context("gateway.admin_tokens_file")?,
        None => Vec::new(),
    };
    let callers = if tokens.iter().any(|t| !t.is_empty()) {
        auth::BearerAuth::new("gateway", tokens.into_iter().chain(admin_tokens.iter().cloned()))
    } else {
        // No caller tokens: calls are open, and the admin RPCs alone ask for an admin token.
        auth::BearerAuth::open("gateway")
    };
    Ok((callers, auth::BearerAuth::new("gateway admin", admin_tokens)))
}

/// Binds the configured address and serves until SIGTERM or Ctrl-C (the binary and
/// `llamarec serve gateway`).
pub async fn serve(layers: &ConfigLayers) -> anyhow::Result<()> {
    let listener = serving::bind(layers.section::<GatewayConfig>()?.listen).await?;
    run(layers, listener, serving::shutdown_signal()).await
}

/// Loads everything and serves on `listener` until `shutdown` resolves.
pub async fn run(layers: &ConfigLayers, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let mut config = layers.section::<GatewayConfig>()?;
    // Access settings first, so a bad certificate or token file stops the start at once.
    config.backend_token = auth::resolve_secret("gateway.backend_token", config.backend_token.as_deref(), config.backend_token_file.as_deref())?;
    let (bearer, admin) = access(&config)?;
    let tls = config.tls.as_ref().map(|t| t.server_config()).transpose().context("gateway.tls")?;
    let (retriever_tls, ranker_tls) = match &config.backend_tls {
        Some(b) => (
            Some(b.settings().client_config(b.retriever_domain.as_deref()).context("gateway.backend_tls")?),
            Some(b.settings().client_config(b.ranker_domain.as_deref()).context("gateway.backend_tls")?),
        ),
        None => (None, None),
    };
    let config = Arc::new(config);
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir).with_context(|| format!("loading the catalog from data set {}", data.name))?;
    let catalog = Arc::new(Catalog::from_dataset(&dataset));

    let store = open_store(&config.store, config.max_history).await?;
    if config.seed_from_dataset && store.seed_once(seed_histories(&dataset)).await? {
        tracing::info!(users = dataset.users.len(), "seeded the history store from the data set");
    }
    let fallback = crate::retriever_client::fallback::PopularFallback::from_dataset(&dataset, config.retriever_fallback_items);
    drop(dataset);
    let resolver = catalog.clone();
    let histories =
        Arc::new(UserHistoryCache::new(store, config.cache_bytes, Duration::from_millis(config.cache_ttl_ms)).with_resolver(move |id| resolver.index_of(id)));

    let retriever = RetrieverClient::new(
        auth::endpoint(&config.retriever, retriever_tls.as_ref())
            .context("gateway.retriever")?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy(),
    )
    .max_decoding_message_size(config.max_message_bytes);
    let retriever = Retriever::new(RetrieverCalls::new(retriever, config.backend_token.clone(), &config.retrieve_batching), catalog.clone(), &config);
    let rankers = RankerPool::new(&config.rankers, ranker_tls.clone())?;
    if let Some(dns) = config.rankers.dns.clone() {
        tokio::spawn(rankers.clone().refresh_from_dns(dns, Duration::from_millis(config.rankers.resolve_interval_ms)));
    }
    // The canary's own pods, dialled and refreshed like the stable ones; none: the same pods.
    let canary_rankers = match &config.canary.rankers {
        Some(endpoints) => {
            let pool = RankerPool::new(endpoints, ranker_tls).context("gateway.canary.rankers")?;
            if let Some(dns) = endpoints.dns.clone() {
                tokio::spawn(pool.clone().refresh_from_dns(dns, Duration::from_millis(endpoints.resolve_interval_ms)));
            }
            Some(pool)
        }
        None => None,
    };
    if let Some(addr) = config.metrics_listen {
        llamarec_common::telemetry::install_prometheus(addr, &[]).with_context(|| format!("metrics listener on {addr}"))?;
    }

    let traffic = crate::traffic::TrafficRecorder::start(&config.traffic).context("starting the traffic capture")?;
    // Shadow ranking only exists at weight 0 (above it every request is ranked for real).
    let shadow =
        if config.ranker_weight > 0.0 { None } else { crate::shadow::ShadowRanker::start(&config.shadow_ranker).context("starting shadow ranking")? };
    let ranker = Arc::new(Ranker::new(rankers, catalog.clone(), &config));
    let canary_ranker = match canary_rankers {
        Some(pool) => Arc::new(Ranker::new(pool, catalog.clone(), &config)),
        None => ranker.clone(),
    };
    let canary = Arc::new(Canary::new(&config, ranker.clone(), canary_ranker));
    let service = GatewayService::new(config.clone(), catalog, histories, retriever, ranker)
        .with_canary(canary)
        .with_admin(admin.clone())
        .with_traffic(traffic)
        .with_shadow(shadow)
        .with_fallback(fallback);
    let (health, health_service) = serving::health();
    if let Some(addr) = config.health_listen {
        serving::spawn_health_listener(addr, health_service.clone()).await.context("gateway.health_listen")?;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    health.set_serving::<GatewayServer<GatewayService<AnyStore>>>().await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("gateway.tls")?;
    }
    // Health stays open for probes; everything else needs a token when tokens are configured.
    let router = builder
        .add_service(health_service)
        .add_service(bearer.wrap(serving::reflection(llamarec_proto::FILE_DESCRIPTOR_SET)?))
        .add_service(bearer.wrap(GatewayServer::new(service).max_decoding_message_size(config.max_message_bytes)));
    tracing::info!(
        tls = config.tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        bearer_auth = bearer.is_enabled(),
        admin_rpcs = admin.is_enabled(),
        backend_tls = config.backend_tls.is_some(),
        backend_token = config.backend_token.is_some(),
        "gateway access"
    );
    tracing::info!(
        listen = %listener.local_addr()?,
        retriever = %config.retriever,
        rankers = ?config.rankers.addresses,
        ranker_weight = config.ranker_weight,
        shadow_fraction = config.shadow_ranker.fraction,
        canary_fraction = config.canary.fraction,
        canary_ranker_weight = config.canary.ranker_weight,
        "gateway serving"
    );
    serving::serve_until(router, listener, health, Duration::from_millis(config.shutdown_grace_ms), shutdown).await?;
    Ok(())
}
