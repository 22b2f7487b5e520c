//! `llamarec traffic synth`: a traffic file (the gateway's capture format) from the configured
//! data set's users, with Poisson arrivals, for `llamarec replay`.
//!
//! `llamarec traffic hit-rate --traffic FILE`: from a capture with outcomes (the gateway's
//! `[gateway.traffic]`), per arm of the canary split and per ranker and retriever version: the
//! answered requests, their users, the share of them whose user later interacted with one of the
//! recommended items (the hit rate, over the requests whose user has later events in the
//! capture), its standard error, the degraded rate and the gateway's latency.

use anyhow::{Context, Result};
use crate::loadgen::synth::synth;
use gateway::traffic::{read_traffic, write_traffic, TrafficRecord};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use llamarec_common::config::{AssetsConfig, ConfigLayers};
use llamarec_common::data::{DataConfig, Dataset};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum TrafficCommand {
    /// Write synthetic traffic: users drawn uniformly from the data set, Poisson arrivals.
    Synth(SynthArgs),
    /// Hit rate, degraded rate and latency per canary arm (and per ranker and retriever
    /// version) of a captured traffic file: whether a user later interacted with an item it was
    /// recommended.
    HitRate(HitRateArgs),
}

#[derive(Debug, clap::Args)]
pub struct HitRateArgs {
    /// A capture written by the gateway (`[gateway.traffic] path`). Record every request
    /// (`sample_rate = 1.0`): a user's later events are only seen in the requests captured.
    #[arg(long)]
    traffic: PathBuf,
    /// Print the tables as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// The JSON-lines file to write.
    #[arg(long)]
    out: PathBuf,
    /// Mean arrivals per second.
    #[arg(long)]
    rate: f64,
    /// Seconds of traffic.
    #[arg(long)]
    duration: f64,
    /// Share of requests that skip the ranker (retriever only), 0.0 ..= 1.0.
    #[arg(long, default_value_t = 0.0)]
    skip_ranker_share: f64,
    /// Items per request.
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Candidates for the ranker (0 = the gateway's default).
    #[arg(long, default_value_t = 0)]
    candidates: u32,
    /// Seed of the arrivals and the user draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(layers: &ConfigLayers, cmd: TrafficCommand) -> Result<()> {
    match cmd {
        TrafficCommand::Synth(args) => synth_file(layers, args),
        TrafficCommand::HitRate(args) => hit_rate(&args),
    }
}

fn synth_file(layers: &ConfigLayers, args: SynthArgs) -> Result<()> {
    anyhow::ensure!(args.rate.is_finite() && args.rate > 0.0, "--rate must be > 0");
    anyhow::ensure!(args.duration.is_finite() && args.duration > 0.0, "--duration must be > 0");
    anyhow::ensure!((0.0..=1.0).contains(&args.skip_ranker_share), "--skip-ranker-share must be within 0.0 ..= 1.0");
    let users = dataset_users(layers)?;
    let records = synth(&users, args.rate, Duration::from_secs_f64(args.duration), args.skip_ranker_share, args.k, args.candidates, args.seed);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    write_traffic(&mut out, &records)?;
    out.flush()?;
    let skipped = records.iter().filter(|r| r.skip_ranker).count();
    eprintln!(
        "wrote {}: {} requests over {} s ({:.2} req/s), {} retriever-only, from {} users",
        args.out.display(),
        records.len(),
        args.duration,
        records.len() as f64 / args.duration,
        skipped,
        users.len()
    );
    Ok(())
}

/// The configured data set's user ids.
pub fn dataset_users(layers: &ConfigLayers) -> Result<Vec<String>> {
    let assets = layers.section::<AssetsConfig>()?;
    let data = layers.section::<DataConfig>()?;
    let dataset = Dataset::load(&data, &assets.dir).with_context(|| format!("loading data set {} (run `llamarec fetch`)", data.name))?;
    Ok(dataset.users.iter().map(|u| u.id.clone()).collect())
}

/// One row of the hit-rate tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HitRateRow {
    /// "stable" or "canary" ("-" for a capture from a gateway without the split).
    pub arm: String,
    /// The ranker version (`name version label`), "-" when not ranked; `None` in the per-arm table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranker: Option<String>,
    /// The retriever version; `None` in the per-arm table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriever: Option<String>,
    /// Answered requests.
    pub requests: u64,
    /// Distinct users among them.
    pub users: u64,
    /// Requests whose user has events in later requests of the capture.
    pub followed: u64,
    /// Followed requests with a recommended item among the user's later events.
    pub hits: u64,
    /// `hits / followed`; None without followed requests.
    pub hit_rate: Option<f64>,
    /// Its binomial standard error, `sqrt(p (1 - p) / followed)` (requests of one user are not
    /// independent, so read it as a lower bound).
    pub hit_rate_se: Option<f64>,
    /// Degraded answers over requests.
    pub degraded_rate: f64,
    /// Median latency inside the gateway, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
}

/// What the capture holds besides the rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HitRateReport {
    /// Per arm.
    pub by_arm: Vec<HitRateRow>,
    /// Per arm, ranker version and retriever version.
    pub by_version: Vec<HitRateRow>,
    /// Records in the file.
    pub records: u64,
    /// Records without an outcome (synthetic traffic, older captures).
    pub without_outcome: u64,
    /// Requests that ended with an error, by gRPC code.
    pub failed: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Tally {
    requests: u64,
    users: HashSet<String>,
    followed: u64,
    hits: u64,
    degraded: u64,
    latencies_ms: Vec<f64>,
}

impl Tally {
    fn row(mut self, arm: &str, ranker: Option<String>, retriever: Option<String>) -> HitRateRow {
        self.latencies_ms.sort_by(f64::total_cmp);
        let hit_rate = (self.followed > 0).then(|| self.hits as f64 / self.followed as f64);
        HitRateRow {
            arm: arm.to_string(),
            ranker,
            retriever,
            requests: self.requests,
            users: self.users.len() as u64,
            followed: self.followed,
            hits: self.hits,
            hit_rate,
            hit_rate_se: hit_rate.map(|p| (p * (1.0 - p) / self.followed as f64).sqrt()),
            degraded_rate: if self.requests == 0 { 0.0 } else { self.degraded as f64 / self.requests as f64 },
            p50_ms: percentile(&self.latencies_ms, 0.50),
            p99_ms: percentile(&self.latencies_ms, 0.99),
        }
    }
}

/// Nearest-rank percentile of sorted values; 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn describe_model(m: &Option<gateway::traffic::RecordedModel>) -> String {
    match m {
        Some(m) if m.label.is_empty() => format!("{} {}", m.name, m.version),
        Some(m) => format!("{} {} ({})", m.name, m.version, m.label),
        None => "-".into(),
    }
}

/// The hit-rate tables of `records` (any order). A request's "later events" are the events the
/// same user's requests that arrived strictly later appended (`append_events`); events sent with
/// the request itself were appended before it was answered and do not count.
pub fn hit_rates(records: &[TrafficRecord]) -> HitRateReport {
    let mut report = HitRateReport { records: records.len() as u64, ..Default::default() };
    // Per user, the record indices by arrival.
    let mut by_user: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        by_user.entry(r.user_id.as_str()).or_default().push(i);
    }
    // Per answered record: (followed, hit), from the user's later events, walking each user's
    // requests from the last one back and collecting the items of the strictly later ones.
    let mut judged: Vec<Option<(bool, bool)>> = vec![None; records.len()];
    for indices in by_user.values_mut() {
        indices.sort_by(|&a, &b| records[a].offset_ms.total_cmp(&records[b].offset_ms));
        let mut later: HashSet<&str> = HashSet::new();
        let mut pos = indices.len();
        while pos > 0 {
            // The requests that arrived at the same instant are not later than each other.
            let offset = records[indices[pos - 1]].offset_ms;
            let mut start = pos;
            while start > 0 && records[indices[start - 1]].offset_ms == offset {
                start -= 1;
            }
            for &i in &indices[start..pos] {
                if let Some(o) = records[i].outcome.as_ref().filter(|o| o.is_ok()) {
                    let hit = o.items.iter().any(|item| later.contains(item.as_str()));
                    judged[i] = Some((!later.is_empty(), hit));
                }
            }
            for &i in &indices[start..pos] {
                later.extend(records[i].events.iter().map(|e| e.item_id.as_str()));
            }
            pos = start;
        }
    }
    let mut by_arm: BTreeMap<String, Tally> = BTreeMap::new();
    let mut by_version: BTreeMap<(String, String, String), Tally> = BTreeMap::new();
    for (r, judged) in records.iter().zip(judged) {
        let Some(outcome) = &r.outcome else {
            report.without_outcome += 1;
            continue;
        };
        let Some((followed, hit)) = judged else {
            *report.failed.entry(outcome.code.clone()).or_default() += 1;
            continue;
        };
        let arm = if outcome.arm.is_empty() { "-".to_string() } else { outcome.arm.clone() };
        let version = (arm.clone(), describe_model(&outcome.ranker_model), describe_model(&outcome.retriever_model));
        for tally in [by_arm.entry(arm).or_default(), by_version.entry(version).or_default()] {
            tally.requests += 1;
            tally.users.insert(r.user_id.clone());
            tally.followed += u64::from(followed);
            tally.hits += u64::from(hit);
            tally.degraded += u64::from(outcome.degraded);
            tally.latencies_ms.push(outcome.latency_ms);
        }
    }
    report.by_arm = by_arm.into_iter().map(|(arm, t)| t.row(&arm, None, None)).collect();
    report.by_version = by_version.into_iter().map(|((arm, ranker, retriever), t)| t.row(&arm, Some(ranker), Some(retriever))).collect();
    report
}

fn hit_rate(args: &HitRateArgs) -> Result<()> {
    let records = read_traffic(&args.traffic)?;
    let report = hit_rates(&records);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    anyhow::ensure!(
        report.without_outcome < report.records,
        "{}: none of its {} records has an outcome: capture with a gateway's [gateway.traffic] (synthetic traffic has none)",
        args.traffic.display(),
        report.records
    );
    print!("{}", render(&report));
    Ok(())
}

/// The report as text tables.
pub fn render(report: &HitRateReport) -> String {
    fn rate(row: &HitRateRow) -> String {
        match (row.hit_rate, row.hit_rate_se) {
            (Some(p), Some(se)) => format!("{:.4} ± {:.4}", p, se),
            _ => "-".into(),
        }
    }
    fn numbers(row: &HitRateRow) -> String {
        format!(
            "{:>8} {:>6} {:>8} {:>6} {:>17} {:>8.4} {:>9.1} {:>9.1}",
            row.requests,
            row.users,
            row.followed,
            row.hits,
            rate(row),
            row.degraded_rate,
            row.p50_ms,
            row.p99_ms
        )
    }
    let header = format!("{:>8} {:>6} {:>8} {:>6} {:>17} {:>8} {:>9} {:>9}", "requests", "users", "followed", "hits", "hit rate ± se", "degraded", "p50 ms", "p99 ms");
    let mut out = String::new();
    out.push_str(&format!("by arm\n{:<8} {header}\n", "arm"));
    for row in &report.by_arm {
        out.push_str(&format!("{:<8} {}\n", row.arm, numbers(row)));
    }
    out.push_str(&format!("\nby arm and version\n{:<8} {header}  ranker / retriever\n", "arm"));
    for row in &report.by_version {
        let ranker = row.ranker.as_deref().unwrap_or("-");
        let retriever = row.retriever.as_deref().unwrap_or("-");
        out.push_str(&format!("{:<8} {}  {ranker} / {retriever}\n", row.arm, numbers(row)));
    }
    out.push_str(&format!(
        "\n{} records; hit rate = hits / followed (requests whose user appended events in a later captured request)\n",
        report.records
    ));
    if report.without_outcome > 0 {
        out.push_str(&format!("{} records without an outcome (skipped)\n", report.without_outcome));
    }
    for (code, n) in &report.failed {
        out.push_str(&format!("{n} requests failed with {code}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::traffic::{RecordedModel, TrafficEvent, TrafficOutcome};

    fn model(name: &str, version: &str) -> Option<RecordedModel> {
        Some(RecordedModel { name: name.into(), version: version.into(), label: String::new() })
    }

    /// A record of `user` at `offset_ms` appending `events`, answered in `arm` with `items`.
    fn record(offset_ms: f64, user: &str, events: &[&str], answer: Option<(&str, &[&str], bool, f64)>) -> TrafficRecord {
        TrafficRecord {
            offset_ms,
            unix_ms: None,
            user_id: user.into(),
            k: 2,
            candidates: 0,
            skip_ranker: false,
            inline_history: None,
            events: events.iter().map(|e| TrafficEvent { item_id: e.to_string(), timestamp_ms: 0 }).collect(),
            deadline_ms: None,
            outcome: answer.map(|(arm, items, degraded, latency_ms)| TrafficOutcome {
                code: "Ok".into(),
                arm: arm.into(),
                ranker_weight: if arm == "canary" { 0.5 } else { 0.0 },
                items: items.iter().map(|i| i.to_string()).collect(),
                degraded,
                degraded_reason: degraded.then(|| "DEGRADED_REASON_RANKER_TIMEOUT".into()),
                retriever_model: model("lrurec", "r1"),
                ranker_model: (arm == "canary" && !degraded).then(|| model("llm", "c1")).flatten(),
                latency_ms,
            }),
        }
    }

    #[test]
    fn hits_count_only_later_events_of_the_same_user_per_arm_and_version() {
        let mut records = vec![
            // u1 (stable): recommended a, b; later appends b: a hit. Then c, d; nothing after.
            record(0.0, "u1", &["x"], Some(("stable", &["a", "b"], false, 10.0))),
            record(5.0, "u1", &["b"], Some(("stable", &["c", "d"], false, 20.0))),
            // u2 (stable): recommended e; a later request appends f and e: a hit. That request's
            // own events were appended before its answer (g), which no later request follows.
            record(1.0, "u2", &[], Some(("stable", &["e"], false, 30.0))),
            record(6.0, "u2", &["f", "e"], Some(("stable", &["g"], false, 40.0))),
            // u3 (canary): recommended h; a later request appends h: hit. One degraded answer.
            record(2.0, "u3", &[], Some(("canary", &["h", "i"], false, 100.0))),
            record(3.0, "u3", &[], Some(("canary", &["j"], true, 50.0))),
            record(7.0, "u3", &["h"], None),
            // Another user appending a stable user's recommended item is no hit for it.
            record(8.0, "u4", &["c", "d", "g"], Some(("canary", &["a"], false, 60.0))),
            // A failed request.
            record(9.0, "u4", &[], None),
        ];
        records[8].outcome = Some(TrafficOutcome::failed(tonic::Code::Unavailable, std::time::Duration::from_millis(1)));
        // The order in the file does not matter.
        records.reverse();
        let report = hit_rates(&records);
        assert_eq!((report.records, report.without_outcome), (9, 1));
        assert_eq!(report.failed, BTreeMap::from([("Unavailable".to_string(), 1)]));
        let arms: Vec<&str> = report.by_arm.iter().map(|r| r.arm.as_str()).collect();
        assert_eq!(arms, ["canary", "stable"]);
        let canary = &report.by_arm[0];
        // u3 at 2.0 and 3.0 are both followed by the request at 7.0 (h): hit, miss; u4 unfollowed.
        assert_eq!((canary.requests, canary.users, canary.followed, canary.hits), (3, 2, 2, 1));
        assert_eq!(canary.hit_rate, Some(0.5));
        assert!((canary.hit_rate_se.unwrap() - (0.25f64 / 2.0).sqrt()).abs() < 1e-12);
        assert!((canary.degraded_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!((canary.p50_ms, canary.p99_ms), (60.0, 100.0));
        let stable = &report.by_arm[1];
        // Followed: u1@0 (b came later) and u2@1 (e came later); u1@5 and u2@6 are the last.
        assert_eq!((stable.requests, stable.users, stable.followed), (4, 2, 2));
        assert_eq!(stable.hits, 2, "u1's b and u2's e were appended in later requests");
        assert_eq!(stable.hit_rate, Some(1.0));
        assert_eq!(stable.hit_rate_se, Some(0.0));
        assert_eq!((stable.p50_ms, stable.p99_ms, stable.degraded_rate), (20.0, 40.0, 0.0));

        // Per version: the canary's degraded answer has no ranker version.
        let versions: Vec<(&str, &str, &str, u64)> =
            report.by_version.iter().map(|r| (r.arm.as_str(), r.ranker.as_deref().unwrap(), r.retriever.as_deref().unwrap(), r.requests)).collect();
        assert_eq!(versions, [("canary", "-", "lrurec r1", 1), ("canary", "llm c1", "lrurec r1", 2), ("stable", "-", "lrurec r1", 4)]);
        let text = render(&report);
        assert!(text.contains("canary") && text.contains("0.5000 ± 0.3536") && text.contains("llm c1 / lrurec r1"), "{text}");
        assert!(text.contains("1 requests failed with Unavailable"), "{text}");
    }

    #[test]
    fn same_instant_requests_are_not_later_than_each_other() {
        let records = vec![record(1.0, "u", &["a"], Some(("stable", &["a"], false, 1.0))), record(1.0, "u", &["a"], Some(("stable", &["a"], false, 1.0)))];
        let report = hit_rates(&records);
        assert_eq!((report.by_arm[0].followed, report.by_arm[0].hits, report.by_arm[0].hit_rate), (0, 0, None));
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
    }
}
