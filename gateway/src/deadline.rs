//! The caller's gRPC deadline and the time budget of each stage.

use std::future::Future;
use std::time::{Duration, Instant};
use tonic::{Code, Status};

/// Parses a `grpc-timeout` header value ("250m", "5S", ...; at most 8 digits and a unit).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When this request must be answered.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    end: Instant,
    reserve: Duration,
}

impl Deadline {
    /// A deadline `timeout` after `start`, keeping `reserve` back for merging and replying.
    pub fn new(start: Instant, timeout: Duration, reserve: Duration) -> Self {
        Self { start, end: start + timeout, reserve }
    }

    /// A caller's deadline: `timeout` after `start`, keeping back the larger of `reserve_min`
    /// and `reserve_fraction` of the timeout.
    pub fn for_caller(start: Instant, timeout: Duration, reserve_min: Duration, reserve_fraction: f64) -> Self {
        Self::new(start, timeout, reserve_min.max(timeout.mul_f64(reserve_fraction)))
    }

    /// Time left for stage work, after the reserve.
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now()).saturating_sub(self.reserve)
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Awaits a backend call (Retrieve, Rank) for at most `budget`: `None` when the budget ran out
/// first. A CANCELLED answer that comes while budget is left did not come from a deadline:
/// hyper cancels the calls of a connection that went away (a backend killed mid-flight, a pod
/// gone), and tonic reports that as CANCELLED. It becomes UNAVAILABLE, as a refused connection
/// is, so the caller sees the backend is down (not a deadline it did not exceed) and the
/// endpoint counts as failed. A backend's own expired `grpc-timeout` also answers CANCELLED,
/// but its clock starts after ours, so that one arrives once the budget is spent.
pub async fn within_budget<T>(budget: Duration, call: impl Future<Output = Result<T, Status>>) -> Option<Result<T, Status>> {
    let started = Instant::now();
    let answer = tokio::time::timeout(budget, call).await.ok()?;
    Some(answer.map_err(|status| {
        if status.code() == Code::Cancelled && started.elapsed() < budget {
            Status::unavailable(format!("connection lost: {}", status.message()))
        } else {
            status
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_garbage() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "12", "5x", "123456789m", "-5m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn remaining_keeps_the_reserve() {
        let d = Deadline::new(Instant::now(), Duration::from_millis(100), Duration::from_millis(30));
        assert!(d.remaining() <= Duration::from_millis(70));
        let past = Deadline::new(Instant::now() - Duration::from_secs(1), Duration::from_millis(10), Duration::ZERO);
        assert_eq!(past.remaining(), Duration::ZERO);
    }

    #[test]
    fn the_reserve_grows_with_the_callers_deadline() {
        let now = Instant::now();
        let short = Deadline::for_caller(now, Duration::from_millis(20), Duration::from_millis(2), 0.05);
        assert_eq!(short.reserve, Duration::from_millis(2), "the minimum wins on short deadlines");
        let long = Deadline::for_caller(now, Duration::from_secs(5), Duration::from_millis(2), 0.05);
        assert_eq!(long.reserve, Duration::from_millis(250));
        assert!(long.remaining() <= Duration::from_millis(4_750));
    }

    /// What a killed backend's connection gives (CANCELLED at once) reads as UNAVAILABLE; other
    /// codes and answers are untouched; a call that outlasts the budget is `None`.
    #[tokio::test]
    async fn a_cancel_before_the_budget_is_spent_is_a_lost_connection() {
        let budget = Duration::from_secs(30);
        let lost = within_budget(budget, async { Err::<(), _>(Status::cancelled("operation was canceled")) }).await.unwrap().unwrap_err();
        assert_eq!((lost.code(), lost.message()), (Code::Unavailable, "connection lost: operation was canceled"));
        let refused = within_budget(budget, async { Err::<(), _>(Status::invalid_argument("bad")) }).await.unwrap().unwrap_err();
        assert_eq!((refused.code(), refused.message()), (Code::InvalidArgument, "bad"));
        assert_eq!(within_budget(budget, async { Ok::<_, Status>(7) }).await.unwrap().unwrap(), 7);
        let slow = within_budget(Duration::from_millis(20), async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, Status>(())
        });
        assert!(slow.await.is_none());
    }
}
