//! Client-side balancing over ranker pods: power of two choices on in-flight requests, with
//! endpoints that failed recently avoided for a while, and the endpoint set refreshed from DNS
//! (a Kubernetes headless Service resolves to one address per ready pod), so new pods get
//! traffic without a restart. Each endpoint takes at most `max_in_flight_per_endpoint` requests
//! from this gateway at once; beyond that the caller skips the ranker (degraded, overload)
//! instead of queueing behind it.

use crate::config::RankerEndpoints;
use llamarec_proto::v1::ranker_client::RankerClient;
use rand::Rng;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, ClientTlsConfig};

/// One ranker pod.
pub struct RankerEndpoint {
    /// `host:port`.
    pub address: String,
    client: RankerClient<Channel>,
    in_flight: AtomicUsize,
    /// Milliseconds since the pool's epoch before which this endpoint is avoided.
    ejected_until_ms: AtomicU64,
}

/// A request's claim on an endpoint; in-flight count drops when it is dropped.
pub struct Lease {
    endpoint: Arc<RankerEndpoint>,
}

impl Lease {
    /// A client for this endpoint (cheap clone of a shared channel).
    pub fn client(&self) -> RankerClient<Channel> {
        self.endpoint.client.clone()
    }

    /// The endpoint's address.
    pub fn address(&self) -> &str {
        &self.endpoint.address
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// No endpoint is configured or resolved.
    Empty,
    /// Every usable endpoint already has `limit` requests from this gateway in flight.
    AtCapacity {
        /// The configured per-endpoint limit.
        limit: usize,
    },
}

/// The set of ranker endpoints.
pub struct RankerPool {
    endpoints: RwLock<Vec<Arc<RankerEndpoint>>>,
    epoch: Instant,
    eject: Duration,
    /// Most requests in flight to one endpoint.
    limit: usize,
    /// TLS towards every endpoint (`[gateway.backend_tls]`), or plaintext.
    tls: Option<ClientTlsConfig>,
}

fn connect_lazy(address: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<RankerClient<Channel>> {
    let channel = llamarec_common::auth::endpoint(address, tls)?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(RankerClient::new(channel))
}

impl RankerPool {
    /// A pool over the static addresses (DNS refresh is started separately), dialled with
    /// `tls` when given.
    pub fn new(config: &RankerEndpoints, tls: Option<ClientTlsConfig>) -> anyhow::Result<Arc<Self>> {
        let pool = Arc::new(Self {
            endpoints: RwLock::new(Vec::new()),
            epoch: Instant::now(),
            eject: Duration::from_millis(config.eject_ms),
            limit: config.max_in_flight_per_endpoint.max(1),
            tls,
        });
        pool.set_addresses(config.addresses.iter().cloned().collect())?;
        Ok(pool)
    }

    /// Replaces the endpoint set, keeping existing endpoints (and their connections) that stay.
    pub fn set_addresses(&self, addresses: BTreeSet<String>) -> anyhow::Result<()> {
        let current = self.endpoints.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next = Vec::with_capacity(addresses.len());
        for address in addresses {
            match current.iter().find(|e| e.address == address) {
                Some(existing) => next.push(existing.clone()),
                None => {
                    tracing::info!(%address, "ranker endpoint added");
                    next.push(Arc::new(RankerEndpoint {
                        client: connect_lazy(&address, self.tls.as_ref())?,
                        address,
                        in_flight: AtomicUsize::new(0),
                        ejected_until_ms: AtomicU64::new(0),
                    }));
                }
            }
        }
        for gone in current.iter().filter(|e| !next.iter().any(|n| n.address == e.address)) {
            tracing::info!(address = %gone.address, "ranker endpoint removed");
        }
        *self.endpoints.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Addresses currently in the pool.
    pub fn addresses(&self) -> Vec<String> {
        self.endpoints.read().unwrap_or_else(|e| e.into_inner()).iter().map(|e| e.address.clone()).collect()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Picks an endpoint: two at random among those below their in-flight limit, the one with
    /// fewer requests in flight; endpoints that failed recently only when every endpoint did.
    /// The claim is taken atomically, so concurrent picks never exceed the limit.
    pub fn pick(&self) -> Result<Lease, PickError> {
        let endpoints = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        let healthy: Vec<&Arc<RankerEndpoint>> = endpoints.iter().filter(|e| e.ejected_until_ms.load(Ordering::Relaxed) <= now).collect();
        let mut candidates: Vec<&Arc<RankerEndpoint>> = if healthy.is_empty() { endpoints.iter().collect() } else { healthy };
        if candidates.is_empty() {
            return Err(PickError::Empty);
        }
        loop {
            candidates.retain(|e| e.in_flight.load(Ordering::Relaxed) < self.limit);
            let chosen = match candidates.len() {
                0 => return Err(PickError::AtCapacity { limit: self.limit }),
                1 => candidates[0],
                n => {
                    let mut rng = rand::thread_rng();
                    let a = rng.gen_range(0..n);
                    let b = (a + rng.gen_range(1..n)) % n;
                    let (x, y) = (candidates[a], candidates[b]);
                    if y.in_flight.load(Ordering::Relaxed) < x.in_flight.load(Ordering::Relaxed) {
                        y
                    } else {
                        x
                    }
                }
            };
            // Another request may have taken the last place since the check: then look again.
            if chosen.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < self.limit).then_some(n + 1)).is_ok() {
                return Ok(Lease { endpoint: chosen.clone() });
            }
        }
    }

    /// Marks the lease's endpoint as failing: avoided for the configured ejection time.
    pub fn report_failure(&self, lease: &Lease) {
        lease.endpoint.ejected_until_ms.store(self.now_ms() + self.eject.as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks the lease's endpoint as healthy again.
    pub fn report_success(&self, lease: &Lease) {
        lease.endpoint.ejected_until_ms.store(0, Ordering::Relaxed);
    }

    /// Re-resolves `dns` (`host:port`) forever, replacing the endpoint set with what it
    /// resolves to. A failed or empty resolution keeps the current set.
    pub async fn refresh_from_dns(self: Arc<Self>, dns: String, interval: Duration) {
        loop {
            match tokio::net::lookup_host(dns.as_str()).await {
                Ok(addrs) => {
                    let set: BTreeSet<String> = addrs.map(|a: SocketAddr| a.to_string()).collect();
                    if set.is_empty() {
                        tracing::warn!(%dns, "ranker DNS name resolved to nothing; keeping endpoints");
                    } else if let Err(e) = self.set_addresses(set) {
                        tracing::warn!(%dns, error = %e, "bad ranker address from DNS");
                    }
                }
                Err(e) => tracing::warn!(%dns, error = %e, "ranker DNS resolution failed; keeping endpoints"),
            }
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(addrs: &[&str]) -> Arc<RankerPool> {
        RankerPool::new(&RankerEndpoints { addresses: addrs.iter().map(|s| s.to_string()).collect(), ..Default::default() }, None).unwrap()
    }

    #[tokio::test]
    async fn two_choices_prefer_the_less_loaded_endpoint() {
        // With two endpoints both are always sampled, so held leases stay balanced within one;
        // picking at random would drift apart.
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"]);
        let mut held = Vec::new();
        for n in 1..=40 {
            held.push(p.pick().unwrap());
            let on_first = held.iter().filter(|l| l.address() == "127.0.0.1:1").count();
            assert!(on_first.abs_diff(n - on_first) <= 1, "{on_first} of {n} on the first endpoint");
        }
        // Releasing leases of one endpoint sends the next picks there.
        held.retain(|l| l.address() == "127.0.0.1:2");
        assert_eq!(p.pick().unwrap().address(), "127.0.0.1:1");
    }

    #[tokio::test]
    async fn failed_endpoints_are_avoided_unless_all_failed() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"]);
        let first = p.pick().unwrap();
        p.report_failure(&first);
        let failed = first.address().to_string();
        drop(first);
        for _ in 0..20 {
            assert_ne!(p.pick().unwrap().address(), failed);
        }
        let other = p.pick().unwrap();
        p.report_failure(&other);
        drop(other);
        assert!(p.pick().is_ok(), "all ejected: still pick one rather than fail");
    }

    #[tokio::test]
    async fn set_addresses_keeps_survivors_and_empty_pool_picks_none() {
        let p = pool(&["127.0.0.1:1"]);
        let lease = p.pick().unwrap();
        p.set_addresses(["127.0.0.1:1".to_string(), "127.0.0.1:3".to_string()].into()).unwrap();
        assert_eq!(p.addresses(), ["127.0.0.1:1", "127.0.0.1:3"]);
        drop(lease);
        p.set_addresses(BTreeSet::new()).unwrap();
        assert_eq!(p.pick().err(), Some(PickError::Empty));
    }

    #[tokio::test]
    async fn endpoints_take_at_most_their_in_flight_limit() {
        let p = RankerPool::new(&RankerEndpoints {
            addresses: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            max_in_flight_per_endpoint: 2,
            ..Default::default()
        }, None)
        .unwrap();
        let held: Vec<Lease> = (0..4).map(|_| p.pick().unwrap()).collect();
        assert_eq!(held.iter().filter(|l| l.address() == "127.0.0.1:1").count(), 2);
        assert_eq!(p.pick().err(), Some(PickError::AtCapacity { limit: 2 }), "both endpoints full");
        drop(held);
        assert!(p.pick().is_ok(), "places are given back when leases drop");

        // Concurrent picks never overshoot the limit.
        let p = RankerPool::new(&RankerEndpoints { addresses: vec!["127.0.0.1:1".into()], max_in_flight_per_endpoint: 3, ..Default::default() }, None).unwrap();
        let leases: Vec<Option<Lease>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(|| p.pick().ok())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(leases.iter().flatten().count(), 3);
    }

    #[tokio::test]
    async fn dns_refresh_resolves_names() {
        let p = pool(&[]);
        let task = tokio::spawn(p.clone().refresh_from_dns("localhost:50999".into(), Duration::from_millis(10)));
        for _ in 0..100 {
            if !p.addresses().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(p.addresses().iter().any(|a| a.ends_with(":50999")), "{:?}", p.addresses());
    }
}
