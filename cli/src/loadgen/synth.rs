//! Synthetic traffic (`llamarec traffic synth`, `llamarec bench replay`): users drawn from the
//! data set, Poisson arrivals, in the gateway's capture format.

use super::schedule::poisson_offsets;
use gateway::traffic::TrafficRecord;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Synthetic traffic: Poisson arrivals at `rate` per second for `duration`, each from a user
/// drawn uniformly from `users` (seeded), asking for `k` items; a `skip_ranker_share` of them
/// retriever only. No inline histories: the gateway reads each user's stored one.
pub fn synth(users: &[String], rate: f64, duration: Duration, skip_ranker_share: f64, k: u32, candidates: u32, seed: u64) -> Vec<TrafficRecord> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_0f7a_ff1c);
    poisson_offsets(rate, duration, seed)
        .into_iter()
        .filter(|_| !users.is_empty())
        .map(|offset| TrafficRecord {
            offset_ms: offset.as_secs_f64() * 1e3,
            unix_ms: None,
            user_id: users[rng.gen_range(0..users.len())].clone(),
            k,
            candidates,
            skip_ranker: rng.gen::<f64>() < skip_ranker_share,
            inline_history: None,
            events: Vec::new(),
            deadline_ms: None,
            outcome: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synth_draws_users_and_the_skip_share() {
        let users: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
        let t = synth(&users, 100.0, Duration::from_secs(100), 0.25, 10, 20, 5);
        assert!((9_500..10_500).contains(&t.len()), "{}", t.len());
        assert!(t.windows(2).all(|w| w[0].offset_ms <= w[1].offset_ms));
        assert!(t.iter().all(|r| users.contains(&r.user_id) && r.k == 10 && r.candidates == 20 && r.inline_history.is_none()));
        let skipped = t.iter().filter(|r| r.skip_ranker).count() as f64 / t.len() as f64;
        assert!((skipped - 0.25).abs() < 0.03, "{skipped}");
        let distinct: std::collections::HashSet<_> = t.iter().map(|r| &r.user_id).collect();
        assert_eq!(distinct.len(), 50);
        assert_eq!(t, synth(&users, 100.0, Duration::from_secs(100), 0.25, 10, 20, 5), "seeded");
        assert!(synth(&[], 100.0, Duration::from_secs(1), 0.0, 10, 0, 1).is_empty());
    }
}
