//! When a replay sends its requests: the recorded arrival gaps (sped up or slowed down), or a
//! fixed rate with uniform or Poisson arrivals cycling through the traffic file's requests.

use gateway::traffic::TrafficRecord;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// When requests are sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// The recorded arrival gaps divided by `speed` (2.0 = twice as fast), from the first record.
    Recorded { speed: f64 },
    /// `rate` requests per second for `duration`, cycling through the records in order.
    Fixed { rate: f64, duration: Duration, arrivals: Arrivals },
}

/// Arrival process of a fixed-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Evenly spaced, `1 / rate` apart.
    Uniform,
    /// Poisson: exponential gaps with mean `1 / rate`, from a seeded generator.
    Poisson { seed: u64 },
}

/// Arrival offsets of a Poisson process of `rate` per second over `duration`.
pub fn poisson_offsets(rate: f64, duration: Duration, seed: u64) -> Vec<Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let mut out = Vec::new();
    if rate <= 0.0 {
        return out;
    }
    loop {
        let u: f64 = rng.gen(); // [0, 1)
        t += -(1.0 - u).ln() / rate;
        if t >= duration.as_secs_f64() {
            return out;
        }
        out.push(Duration::from_secs_f64(t));
    }
}

/// The send plan: (offset from the start, index into `traffic`), in time order.
pub fn plan(traffic: &[TrafficRecord], schedule: &Schedule) -> anyhow::Result<Vec<(Duration, usize)>> {
    anyhow::ensure!(!traffic.is_empty(), "the traffic file holds no requests");
    Ok(match schedule {
        Schedule::Recorded { speed } => {
            anyhow::ensure!(speed.is_finite() && *speed > 0.0, "speed must be > 0");
            let first = traffic.iter().map(|r| r.offset_ms).fold(f64::INFINITY, f64::min);
            let mut plan: Vec<_> =
                traffic.iter().enumerate().map(|(i, r)| (Duration::from_secs_f64(((r.offset_ms - first) / 1e3 / speed).max(0.0)), i)).collect();
            plan.sort_by_key(|p| p.0);
            plan
        }
        Schedule::Fixed { rate, duration, arrivals } => {
            anyhow::ensure!(rate.is_finite() && *rate > 0.0, "rate must be > 0");
            let offsets = match arrivals {
                Arrivals::Uniform => {
                    (0..(rate * duration.as_secs_f64()).ceil() as u64).map(|i| Duration::from_secs_f64(i as f64 / rate)).filter(|d| d < duration).collect()
                }
                Arrivals::Poisson { seed } => poisson_offsets(*rate, *duration, *seed),
            };
            offsets.into_iter().enumerate().map(|(i, d)| (d, i % traffic.len())).collect()
        }
    })
}

/// The schedule, in words (the report's `schedule`).
pub fn describe(schedule: &Schedule) -> String {
    match schedule {
        Schedule::Recorded { speed } => format!("recorded arrivals at {speed}x speed"),
        Schedule::Fixed { rate, duration, arrivals } => {
            let kind = match arrivals {
                Arrivals::Uniform => "uniform".to_string(),
                Arrivals::Poisson { seed } => format!("Poisson (seed {seed})"),
            };
            format!("{rate} req/s for {:.1} s, {kind} arrivals", duration.as_secs_f64())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `n` retriever-only records 250 ms apart, from 1 s on, users "0", "1", ...
    pub(crate) fn records(n: usize) -> Vec<TrafficRecord> {
        (0..n)
            .map(|i| TrafficRecord {
                offset_ms: 1000.0 + 250.0 * i as f64,
                unix_ms: None,
                user_id: i.to_string(),
                k: 10,
                candidates: 0,
                skip_ranker: true,
                inline_history: None,
                events: vec![],
                deadline_ms: None,
                outcome: None,
            })
            .collect()
    }

    #[test]
    fn recorded_schedule_keeps_gaps_scaled_by_speed() {
        let t = records(4);
        let p = plan(&t, &Schedule::Recorded { speed: 2.0 }).unwrap();
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(p.iter().map(|x| x.0.as_millis()).collect::<Vec<_>>(), [0, 125, 250, 375]);
        assert!(plan(&t, &Schedule::Recorded { speed: 0.0 }).is_err());
        assert!(plan(&[], &Schedule::Recorded { speed: 1.0 }).is_err());
    }

    #[test]
    fn fixed_schedule_cycles_the_records() {
        let t = records(3);
        let p = plan(&t, &Schedule::Fixed { rate: 10.0, duration: Duration::from_secs(1), arrivals: Arrivals::Uniform }).unwrap();
        assert_eq!(p.len(), 10);
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(p[9].0.as_millis(), 900);
        let poisson = Schedule::Fixed { rate: 200.0, duration: Duration::from_secs(50), arrivals: Arrivals::Poisson { seed: 3 } };
        let p = plan(&t, &poisson).unwrap();
        // 10,000 expected; the count of a Poisson process has standard deviation 100.
        assert!((9_500..10_500).contains(&p.len()), "{}", p.len());
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0) && p.last().unwrap().0 < Duration::from_secs(50));
        assert_eq!(p, plan(&t, &poisson).unwrap(), "seeded");
    }

    #[test]
    fn poisson_gaps_are_exponential() {
        let offsets = poisson_offsets(100.0, Duration::from_secs(200), 11);
        let gaps: Vec<f64> = std::iter::once(offsets[0].as_secs_f64()).chain(offsets.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.01).abs() < 0.0005, "mean gap {mean}");
        // Exponential: about e^-1 of the gaps exceed the mean.
        let above = gaps.iter().filter(|&&g| g > 0.01).count() as f64 / gaps.len() as f64;
        assert!((above - (-1f64).exp()).abs() < 0.02, "{above}");
    }
}
