//! What a benchmark records about the process and the machine it ran on: runnable threads,
//! memory, load, CPU model and SIMD features, the date (CPU time and the median of repeated
//! timings: `llamarec_common::bench`, shared with the ranker's examples).

use serde_json::{json, Value};

/// The CPU features that decide which kernels run (named beside every recorded figure).
const SIMD_FLAGS: [&str; 7] = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"];

/// Samples, every 2 ms, how many of this process's threads are runnable (running or waiting
/// for a CPU): the parallelism the compute asks for, which on a loaded machine CPU time over
/// wall time understates.
pub(crate) struct RunnableSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<f64>,
}

impl RunnableSampler {
    pub(crate) fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut sum, mut samples) = (0usize, 0usize);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                sum += runnable_threads();
                samples += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            // The sampler itself is running while it reads.
            (sum as f64 / samples.max(1) as f64 - 1.0).max(0.0)
        });
        Self { stop, handle }
    }

    /// Mean number of runnable threads over the samples.
    pub(crate) fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or(0.0)
    }
}

/// Threads of this process in state R (running or runnable).
pub(crate) fn runnable_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) == Some("R")
        })
        .count()
}

/// A numeric field of /proc/self/status (kB for memory fields).
pub(crate) fn proc_status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn load_average() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).filter_map(|x| x.parse::<f64>().ok()).collect::<Vec<_>>().into()
}

pub(crate) fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1)).map(str::trim);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok());
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags")?.split(':').nth(1))
        .map(|f| f.split_whitespace().filter(|f| SIMD_FLAGS.contains(f)).collect())
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "simd_flags": flags,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gb": mem_kb.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
    })
}

/// Now, in UTC, as `2026-12-03T15:06:08Z`.
pub(crate) fn now_utc() -> String {
    utc(time::OffsetDateTime::now_utc())
}

fn utc(t: time::OffsetDateTime) -> String {
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_is_rfc3339_in_whole_seconds() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_796_310_368).unwrap();
        assert_eq!(super::utc(t), "2026-12-03T15:06:08Z");
        assert_eq!(super::utc(time::OffsetDateTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(super::now_utc().len(), 20);
    }
}
