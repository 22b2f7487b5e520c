//! What the benchmarks (the CLI's `bench` commands, the ranker's examples) measure about their
//! own runs: the median of repeated timings and this process's CPU time.

/// The median of `xs` (the upper one for an even count); `xs` must not be empty.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// CPU seconds (user + system) used by this process so far, from /proc (10 ms ticks). On a busy
/// machine it tracks the work done better than wall time.
pub fn process_cpu_s() -> f64 {
    let (user, sys) = process_cpu_times();
    user + sys
}

/// User and system CPU seconds used by this process so far (10 ms ticks); 0 where /proc is
/// missing. System time is where page faults and allocation churn show.
pub fn process_cpu_times() -> (f64, f64) {
    cpu_times_of(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default())
}

/// `utime` and `stime` of a `/proc/<pid>/stat` line, in seconds.
fn cpu_times_of(stat: &str) -> (f64, f64) {
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_upper_middle_one() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
    }

    #[test]
    fn cpu_times_are_utime_and_stime_whatever_the_command_name() {
        let stat =
            "4242 (a) b (c)) R 1 4242 4242 0 -1 4194304 120 0 0 0 1234 56 0 0 20 0 3 0 100 1000 10";
        assert_eq!(cpu_times_of(stat), (12.34, 0.56));
        assert_eq!(cpu_times_of(""), (0.0, 0.0));
        assert!(process_cpu_s() >= 0.0);
    }
}
