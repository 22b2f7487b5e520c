//! The canary split (`[gateway.canary]`): a share of users, sticky by user id, whose candidates
//! are ranked by a second set of ranker pods (a new adapter) with a fusion weight of their own.
//! Everyone else is the "stable" arm, served exactly as without a canary. Both arms degrade and
//! fall back alike: the canary arm only swaps which [`Ranker`] is called and which weight merges.
//!
//! A user's arm is a pure function of its id: FNV-1a of the id, salted and mixed with
//! SplitMix64 ([`user_point`]), compared with `fraction` × 2⁶⁴ ([`arm_of`]). Every gateway
//! replica and every restart agrees, raising the fraction only moves users from the stable arm
//! into the canary, and setting the same fraction again moves nobody.
//!
//! The fraction and the canary weight live together in one [`ArcSwap`]: the admin RPC
//! `SetSplit` replaces both at once, a Recommend loads them once, so a request never sees half
//! of a change.

use crate::capture::fnv1a;
use crate::config::{check_fraction, check_weight, GatewayConfig};
use crate::error::GatewayError;
use crate::ranker_client::Ranker;
use arc_swap::ArcSwap;
use llamarec_common::rng::splitmix64;
use std::sync::{Arc, Mutex};

/// Mixed into the user id's hash so that the split is independent of any other sampling that
/// hashes the same id (shadow ranking hashes request ids with the same function).
const SALT: u64 = 0x6361_6e61_7279_7631; // "canaryv1"

/// The arm of the split that serves a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arm {
    /// `[gateway.rankers]` with `[gateway] ranker_weight`.
    Stable,
    /// `[gateway.canary.rankers]` with `[gateway.canary] ranker_weight`.
    Canary,
}

impl Arm {
    /// "stable" or "canary": the metrics label, the response's `arm`, the traffic record's.
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Stable => "stable",
            Arm::Canary => "canary",
        }
    }
}

/// Where a user id falls in `0 ..= u64::MAX`: the same in every process and release.
pub fn user_point(user_id: &str) -> u64 {
    splitmix64(fnv1a(user_id.as_bytes()) ^ SALT)
}

/// The arm of `user_id` when a `fraction` of users is in the canary: canary when the user's
/// point is below `fraction` × 2⁶⁴. A fraction of 0 (or NaN) is nobody, 1 everybody.
pub fn arm_of(user_id: &str, fraction: f64) -> Arm {
    if fraction.is_nan() || fraction <= 0.0 {
        Arm::Stable
    } else if fraction >= 1.0 || user_point(user_id) < (fraction * u64::MAX as f64) as u64 {
        Arm::Canary
    } else {
        Arm::Stable
    }
}

/// The part of the split that can change at run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Share of users in the canary arm.
    pub fraction: f64,
    /// The canary arm's fusion weight.
    pub canary_ranker_weight: f32,
}

/// What serves one request: its arm, the ranker pods to call and the weight to merge with.
pub struct Route<'a> {
    /// The user's arm.
    pub arm: Arm,
    /// The arm's rankers.
    pub ranker: &'a Arc<Ranker>,
    /// The arm's fusion weight.
    pub ranker_weight: f32,
}

/// Both arms and the split between them.
pub struct Canary {
    split: ArcSwap<Split>,
    /// Serialises SetSplit calls, so that each reports the split it replaced.
    set: Mutex<()>,
    stable: Arc<Ranker>,
    canary: Arc<Ranker>,
    stable_ranker_weight: f32,
    /// The canary's endpoints as configured, for GetSplit; empty when it shares the stable pods.
    canary_rankers: Vec<String>,
}

impl Canary {
    /// The split of `config` (`[gateway.canary]`) between the `stable` rankers and the `canary`
    /// ones (the same `Arc` when the canary has no pods of its own).
    /// Publishes the split's gauges (`llamarec_gateway_canary_fraction`,
    /// `llamarec_gateway_ranker_weight{arm}`).
    pub fn new(config: &GatewayConfig, stable: Arc<Ranker>, canary: Arc<Ranker>) -> Self {
        let c = Self::build(config, stable, canary);
        c.publish(c.split());
        c
    }

    /// No canary: every user in the stable arm (the canary arm, should a fraction be set, calls
    /// the same rankers). Publishes nothing: the service's placeholder until the server's split.
    pub fn stable_only(config: &GatewayConfig, stable: Arc<Ranker>) -> Self {
        let mut config = config.clone();
        config.canary = Default::default();
        Self::build(&config, stable.clone(), stable)
    }

    fn build(config: &GatewayConfig, stable: Arc<Ranker>, canary: Arc<Ranker>) -> Self {
        let split = Split { fraction: config.canary.fraction, canary_ranker_weight: config.canary.ranker_weight };
        let canary_rankers = config.canary.rankers.as_ref().map(|r| r.addresses.iter().chain(r.dns.iter()).cloned().collect()).unwrap_or_default();
        Self { split: ArcSwap::from_pointee(split), set: Mutex::new(()), stable, canary, stable_ranker_weight: config.ranker_weight, canary_rankers }
    }

    /// The split in force.
    pub fn split(&self) -> Split {
        **self.split.load()
    }

    /// The stable arm's fusion weight (`[gateway] ranker_weight`).
    pub fn stable_ranker_weight(&self) -> f32 {
        self.stable_ranker_weight
    }

    /// The canary's endpoints as configured; empty when it shares the stable pods.
    pub fn canary_rankers(&self) -> &[String] {
        &self.canary_rankers
    }

    /// The stable arm's rankers (what shadow ranking of the stable arm calls).
    pub fn stable_ranker(&self) -> &Arc<Ranker> {
        &self.stable
    }

    /// How `user_id`'s request is served, from one load of the split.
    pub fn route(&self, user_id: &str) -> Route<'_> {
        let split = self.split.load();
        match arm_of(user_id, split.fraction) {
            Arm::Stable => Route { arm: Arm::Stable, ranker: &self.stable, ranker_weight: self.stable_ranker_weight },
            Arm::Canary => Route { arm: Arm::Canary, ranker: &self.canary, ranker_weight: split.canary_ranker_weight },
        }
    }

    /// Changes the fraction and/or the canary weight (None: unchanged) atomically; returns the
    /// split before and after. A value out of range changes nothing and names the field.
    pub fn set(&self, fraction: Option<f64>, canary_ranker_weight: Option<f32>) -> Result<(Split, Split), GatewayError> {
        if let Some(f) = fraction {
            check_fraction(f).map_err(|e| GatewayError::InvalidArgument(format!("fraction {e}")))?;
        }
        if let Some(w) = canary_ranker_weight {
            check_weight(w).map_err(|e| GatewayError::InvalidArgument(format!("canary_ranker_weight {e}")))?;
        }
        let _one_at_a_time = self.set.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.split();
        let current = Split {
            fraction: fraction.unwrap_or(previous.fraction),
            canary_ranker_weight: canary_ranker_weight.unwrap_or(previous.canary_ranker_weight),
        };
        self.split.store(Arc::new(current));
        self.publish(current);
        tracing::info!(
            previous_fraction = previous.fraction,
            fraction = current.fraction,
            previous_canary_ranker_weight = previous.canary_ranker_weight,
            canary_ranker_weight = current.canary_ranker_weight,
            "canary split set"
        );
        Ok((previous, current))
    }

    /// `llamarec_gateway_canary_fraction` and `llamarec_gateway_ranker_weight{arm}`.
    fn publish(&self, split: Split) {
        metrics::gauge!("llamarec_gateway_canary_fraction").set(split.fraction);
        metrics::gauge!("llamarec_gateway_ranker_weight", "arm" => Arm::Stable.as_str()).set(f64::from(self.stable_ranker_weight));
        metrics::gauge!("llamarec_gateway_ranker_weight", "arm" => Arm::Canary.as_str()).set(f64::from(split.canary_ranker_weight));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::config::CanaryConfig;
    use crate::ranker_client::pool::RankerPool;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    fn share(users: &[String], fraction: f64) -> f64 {
        users.iter().filter(|u| arm_of(u, fraction) == Arm::Canary).count() as f64 / users.len() as f64
    }

    #[test]
    fn the_split_honours_the_fraction_within_statistical_tolerance() {
        let users = users(2_000);
        for fraction in [0.05, 0.3, 0.5, 0.9] {
            // Binomial standard deviation sqrt(f (1 - f) / n) is at most 0.0112 for n = 2,000;
            // allow 4 of them.
            let sd = (fraction * (1.0 - fraction) / users.len() as f64).sqrt();
            let got = share(&users, fraction);
            assert!((got - fraction).abs() < 4.0 * sd, "fraction {fraction}: {got} of users in the canary");
        }
        // The MovieLens ids the loopback tests use ("1" ..= "943") split the same way.
        let ml: Vec<String> = (1..=943).map(|i| i.to_string()).collect();
        let got = share(&ml, 0.3);
        assert!((got - 0.3).abs() < 4.0 * (0.3 * 0.7 / 943.0f64).sqrt(), "{got}");
    }

    #[test]
    fn arms_are_sticky_and_raising_the_fraction_only_adds_canary_users() {
        let users = users(2_000);
        assert!(users.iter().all(|u| arm_of(u, 0.0) == Arm::Stable && arm_of(u, f64::NAN) == Arm::Stable));
        assert!(users.iter().all(|u| arm_of(u, 1.0) == Arm::Canary));
        for u in &users {
            // The same user, the same fraction: the same arm, every time.
            assert_eq!(arm_of(u, 0.3), arm_of(u, 0.3));
            // Monotone in the fraction: a canary user at 0.1 stays canary at 0.3 and 0.7.
            if arm_of(u, 0.1) == Arm::Canary {
                assert_eq!(arm_of(u, 0.3), Arm::Canary, "{u}");
            }
            if arm_of(u, 0.3) == Arm::Canary {
                assert_eq!(arm_of(u, 0.7), Arm::Canary, "{u}");
            }
        }
        // Pinned: the hash is part of the deployment's behaviour (a user must not change arm when
        // the gateway is upgraded), so a change to it must be deliberate.
        assert_eq!(user_point("42"), splitmix64(fnv1a(b"42") ^ SALT));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    fn canary(fraction: f64, weight: f32) -> Canary {
        let config = GatewayConfig {
            ranker_weight: 0.25,
            canary: CanaryConfig { fraction, ranker_weight: weight, rankers: Some(crate::config::RankerEndpoints { addresses: vec!["10.0.0.9:50052".into()], ..Default::default() }) },
            ..Default::default()
        };
        let dataset = llamarec_common::data::Dataset { name: "t".into(), items: Vec::new(), users: Vec::new() };
        let catalog = Arc::new(Catalog::from_dataset(&dataset));
        let pool = |r: &crate::config::RankerEndpoints| RankerPool::new(r, None).unwrap();
        let stable = Arc::new(Ranker::new(pool(&config.rankers), catalog.clone(), &config));
        let canary = Arc::new(Ranker::new(pool(config.canary.rankers.as_ref().unwrap()), catalog, &config));
        Canary::new(&config, stable, canary)
    }

    #[tokio::test]
    async fn routes_follow_the_split_and_set_is_atomic_and_checked() {
        let c = canary(0.0, 0.5);
        assert_eq!(c.canary_rankers(), ["10.0.0.9:50052"]);
        let users = users(200);
        assert!(users.iter().all(|u| c.route(u).arm == Arm::Stable && c.route(u).ranker_weight == 0.25));
        let (before, after) = c.set(Some(1.0), None).unwrap();
        assert_eq!((before.fraction, after.fraction, after.canary_ranker_weight), (0.0, 1.0, 0.5));
        for u in &users {
            let route = c.route(u);
            assert_eq!((route.arm, route.ranker_weight), (Arm::Canary, 0.5));
            assert!(Arc::ptr_eq(route.ranker, &c.canary));
        }
        c.set(Some(0.3), Some(0.75)).unwrap();
        for u in &users {
            let route = c.route(u);
            assert_eq!(route.arm, arm_of(u, 0.3));
            assert_eq!(route.ranker_weight, if route.arm == Arm::Canary { 0.75 } else { 0.25 });
        }
        // Refused values change nothing and name the field.
        for (f, w, field) in [(Some(1.5), None, "fraction"), (Some(f64::NAN), None, "fraction"), (None, Some(-0.1), "canary_ranker_weight"), (Some(0.5), Some(2.0), "canary_ranker_weight")] {
            let err = c.set(f, w).unwrap_err();
            assert!(matches!(&err, GatewayError::InvalidArgument(m) if m.starts_with(field)), "{err}");
        }
        assert_eq!(c.split(), Split { fraction: 0.3, canary_ranker_weight: 0.75 });
        // Nothing given: nothing changes.
        assert_eq!(c.set(None, None).unwrap(), (c.split(), c.split()));
    }
}
