//! `llamarec config check FILE`: every problem of a deployment configuration at once, before a
//! pod finds the first one at start-up. Each section is read by the same type and checked by
//! the same `validate` as the service that reads it (unknown keys, wrong types, bad values, each
//! with its full dotted key), and then the limits one service sets for another are compared:
//! what the gateway may send against what the retriever and the rankers accept.

use anyhow::{bail, Context, Result};
use gateway::config::GatewayConfig;
use llamarec_common::config::{AssetsConfig, ConfigError, ConfigLayers, Section, ENV_PREFIX};
use llamarec_common::data::DataConfig;
use llamarec_common::telemetry::TelemetryConfig;
use ranker_service::service_config::{DeviceSpec, RankerServiceConfig, BUILT_WITH_CUDA};
use retriever_service::service_config::RetrieverServiceConfig;
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Report every problem of a configuration file (unknown keys, bad values, limits that
    /// contradict each other across services); exit 1 when there is any.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The TOML file, e.g. deploy/k8s/base/llamarec.toml.
    file: PathBuf,
    /// An environment override as a Deployment or compose service sets it,
    /// `LLAMAREC_<SECTION>__<KEY>=VALUE` (repeatable). This process's own environment is not
    /// read: the check sees the file and these, nothing from the shell it runs in.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// How many gateway replicas may run at once (the gateway HPA's maxReplicas): each keeps its
    /// own `max_in_flight_per_endpoint` calls to every ranker.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    gateway_replicas: u32,
}

pub fn run(command: &ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Check(args) => check(args),
    }
}

/// The sections some process reads; any other top-level key is a mistake nobody would notice.
const SECTIONS: [&str; 6] = [AssetsConfig::NAME, DataConfig::NAME, TelemetryConfig::NAME, GatewayConfig::NAME, RetrieverServiceConfig::NAME, RankerServiceConfig::NAME];

fn check(args: &CheckArgs) -> Result<()> {
    let env = parse_env(&args.env)?;
    let layers = ConfigLayers::load_with_env(Some(&args.file), Some(env)).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let report = check_layers(&layers, args.gateway_replicas);
    let name = args.file.display();
    for note in &report.notes {
        println!("{name}: note: {note}");
    }
    if report.problems.is_empty() {
        println!("{name}: ok ({} gateway replica(s){})", args.gateway_replicas, if args.env.is_empty() { String::new() } else { format!(", {} environment override(s)", args.env.len()) });
        return Ok(());
    }
    for (key, reason) in &report.problems {
        println!("{name}: {key}: {reason}");
    }
    bail!("{name}: {} problem(s)", report.problems.len())
}

/// `NAME=VALUE` pairs, each a `LLAMAREC_*` variable.
fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            let (name, value) = pair.split_once('=').with_context(|| format!("--env {pair:?}: expected NAME=VALUE"))?;
            if !name.starts_with(&format!("{ENV_PREFIX}_")) || !name.contains("__") {
                bail!("--env {pair:?}: the name must be {ENV_PREFIX}_<SECTION>__<KEY>");
            }
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

/// What the check found: `(dotted key, reason)` problems, and notes that are not problems.
#[derive(Debug, Default)]
struct Report {
    problems: Vec<(String, String)>,
    notes: Vec<String>,
}

impl Report {
    /// Reads one section, recording its problems; its value only when it had none, so that the
    /// cross-service checks never compare a value the service would not have started with.
    fn section<T: Section>(&mut self, layers: &ConfigLayers, validate: impl Fn(&T) -> Result<(), (String, String)>) -> Option<T> {
        match layers.check_section::<T>(validate) {
            Ok(value) => Some(value),
            Err(problems) => {
                self.problems.extend(problems.into_iter().map(|p| match p {
                    ConfigError::Invalid { key, reason, .. } => (key, reason),
                    other => (T::NAME.to_string(), other.to_string()),
                }));
                None
            }
        }
    }
}

fn check_layers(layers: &ConfigLayers, gateway_replicas: u32) -> Report {
    let mut report = Report::default();
    match layers.top_level_keys() {
        Ok(keys) => {
            for key in keys.into_iter().filter(|k| !SECTIONS.contains(&k.as_str())) {
                report.problems.push((key, format!("unknown section; the sections are {}", SECTIONS.join(", "))));
            }
        }
        Err(e) => report.problems.push((String::new(), e.to_string())),
    }
    report.section::<AssetsConfig>(layers, AssetsConfig::validate);
    report.section::<DataConfig>(layers, DataConfig::validate);
    report.section::<TelemetryConfig>(layers, TelemetryConfig::validate);
    let gateway = report.section::<GatewayConfig>(layers, GatewayConfig::validate);
    let retriever = report.section::<RetrieverServiceConfig>(layers, RetrieverServiceConfig::validate);
    // The rankers may run another build than this one (the CUDA image): check the settings, and
    // only note what this build could not serve.
    let ranker = report.section::<RankerServiceConfig>(layers, RankerServiceConfig::validate_settings);
    if let Some(r) = &ranker {
        if matches!(r.device_spec(), DeviceSpec::Cuda(_)) && !BUILT_WITH_CUDA {
            report.notes.push(format!("ranker.device = {:?} needs a ranker built with the `cuda` feature (the ranker-cuda image); this llamarec is not", r.device));
        }
    }
    if let (Some(g), Some(r)) = (&gateway, &retriever) {
        report.problems.extend(gateway_vs_retriever(g, r));
    }
    if let (Some(g), Some(r)) = (&gateway, &ranker) {
        report.problems.extend(gateway_vs_ranker(g, r, gateway_replicas));
    }
    report
}

/// The port of a `host:port` address, if it has one.
fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':').and_then(|(_, port)| port.parse().ok())
}

/// Limits of what the gateway sends the retriever against what the retriever accepts: a request
/// the gateway lets through must not be refused one hop later.
fn gateway_vs_retriever(g: &GatewayConfig, r: &RetrieverServiceConfig) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut above = |key: &str, value: u64, limit_key: &str, limit: u64, what: &str| {
        if value > limit {
            problems.push((format!("gateway.{key}"), format!("is {value}, above retriever.{limit_key} = {limit}: {what}")));
        }
    };
    above("max_candidates", g.max_candidates.into(), "max_k", r.max_k.into(), "a Recommend asking for that many candidates gets INVALID_ARGUMENT from the retriever");
    above("max_history", g.max_history as u64, "max_history", r.max_history.into(), "a long history makes the retriever refuse the request");
    above("max_item_id_len", g.max_item_id_len as u64, "max_item_id_len", r.max_item_id_len as u64, "a history sent as ids (the fallback from dense indices) is refused for a long id");
    if g.retrieve_batching.enabled {
        above(
            "retrieve_batching.max_batch",
            g.retrieve_batching.max_batch as u64,
            "max_batch",
            r.max_batch.into(),
            "a full RetrieveBatch is refused whole",
        );
    }
    if let Some(port) = port_of(&g.retriever).filter(|p| *p != r.listen.port()) {
        problems.push(("gateway.retriever".into(), format!("{:?} is port {port}, but retriever.listen = {} listens on {}", g.retriever, r.listen, r.listen.port())));
    }
    problems
}

/// The gateway against the rankers: the admission rule (README, "Reliability") is that the
/// gateway, not the ranker, decides when a ranker is full, so the calls all gateway replicas may
/// have in flight to one ranker must fit its queue; beyond it the ranker refuses calls the
/// gateway already counted as admitted.
fn gateway_vs_ranker(g: &GatewayConfig, r: &RankerServiceConfig, gateway_replicas: u32) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let endpoints: Vec<&String> = g.rankers.addresses.iter().chain(g.rankers.dns.iter()).collect();
    if endpoints.is_empty() {
        // The gateway calls no ranker: nothing to compare.
        return problems;
    }
    let per_endpoint = g.rankers.max_in_flight_per_endpoint as u64;
    let total = per_endpoint * u64::from(gateway_replicas);
    if total > r.queue_capacity as u64 {
        problems.push((
            "gateway.rankers.max_in_flight_per_endpoint".into(),
            format!(
                "{per_endpoint} calls per ranker endpoint x {gateway_replicas} gateway replica(s) = {total} in flight to one ranker, above ranker.queue_capacity = {}: \
                 keep max_in_flight_per_endpoint x gateway replicas <= queue_capacity",
                r.queue_capacity
            ),
        ));
    }
    if g.prompt_history as usize > r.max_history_titles {
        problems.push((
            "gateway.prompt_history".into(),
            format!("is {}, above ranker.max_history_titles = {}: every Rank call would be refused", g.prompt_history, r.max_history_titles),
        ));
    }
    if let Some(dns) = &g.rankers.dns {
        if let Some(port) = port_of(dns).filter(|p| *p != r.listen.port()) {
            problems.push(("gateway.rankers.dns".into(), format!("{dns:?} is port {port}, but ranker.listen = {} listens on {}", r.listen, r.listen.port())));
        }
    }
    // The canary's own pods run the same ranker configuration: the same admission rule.
    if let Some(canary) = &g.canary.rankers {
        let per_endpoint = canary.max_in_flight_per_endpoint as u64;
        let total = per_endpoint * u64::from(gateway_replicas);
        if (!canary.addresses.is_empty() || canary.dns.is_some()) && total > r.queue_capacity as u64 {
            problems.push((
                "gateway.canary.rankers.max_in_flight_per_endpoint".into(),
                format!(
                    "{per_endpoint} calls per canary ranker endpoint x {gateway_replicas} gateway replica(s) = {total} in flight to one ranker, above \
                     ranker.queue_capacity = {}: keep max_in_flight_per_endpoint x gateway replicas <= queue_capacity",
                    r.queue_capacity
                ),
            ));
        }
        if let Some(port) = canary.dns.as_deref().and_then(port_of).filter(|p| *p != r.listen.port()) {
            problems.push((
                "gateway.canary.rankers.dns".into(),
                format!("{:?} is port {port}, but ranker.listen = {} listens on {}", canary.dns.as_deref().unwrap_or(""), r.listen, r.listen.port()),
            ));
        }
    }
    // Several static rankers on one host listen on several ports (set per process); at least one
    // must be where this file's ranker listens.
    if !g.rankers.addresses.is_empty() && !g.rankers.addresses.iter().any(|a| port_of(a) == Some(r.listen.port())) {
        problems.push((
            "gateway.rankers.addresses".into(),
            format!("{:?}: none is on port {}, where ranker.listen = {} listens", g.rankers.addresses, r.listen.port(), r.listen),
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str, env: &[&str], gateway_replicas: u32) -> Report {
        let dir = tempfile_dir();
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        let env = parse_env(&env.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let layers = ConfigLayers::load_with_env(Some(&path), Some(env)).unwrap();
        check_layers(&layers, gateway_replicas)
    }

    /// A fresh directory under the system temporary directory (the CLI has no tempfile crate).
    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("llamarec-config-check-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn keys(report: &Report) -> Vec<&str> {
        report.problems.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn every_problem_of_every_section_is_reported_at_once() {
        let report = check_text(
            "[gatway]\nlisten = \"x\"\n[gateway]\nranker_wieght = 0.5\nmax_k = 0\n[gateway.rankers]\nmax_in_flight = 3\n\
             [retriever]\nmax_k = \"many\"\n[ranker]\ntemplate = \"llama\"\nqueue_capacity = 0\n",
            &[],
            1,
        );
        let mut found = keys(&report);
        found.sort();
        assert_eq!(
            found,
            ["gateway.max_k", "gateway.ranker_wieght", "gateway.rankers.max_in_flight", "gatway", "ranker.queue_capacity", "ranker.template", "retriever.max_k"],
            "{:#?}",
            report.problems
        );
    }

    #[test]
    fn the_canary_pods_meet_the_same_admission_rule_and_port() {
        let text = "[gateway.rankers]\ndns = \"ranker:50052\"\naddresses = []\nmax_in_flight_per_endpoint = 2\n\
                    [gateway.canary]\nfraction = 0.1\nranker_weight = 0.5\n[gateway.canary.rankers]\naddresses = []\ndns = \"ranker-canary:50052\"\n\
                    max_in_flight_per_endpoint = 4\n[ranker]\nlisten = \"0.0.0.0:50052\"\nqueue_capacity = 8\n";
        assert!(check_text(text, &[], 2).problems.is_empty(), "4 x 2 = 8 fits a queue of 8");
        assert_eq!(keys(&check_text(text, &[], 3)), ["gateway.canary.rankers.max_in_flight_per_endpoint"]);
        let wrong_port = text.replace("ranker-canary:50052", "ranker-canary:50053");
        assert_eq!(keys(&check_text(&wrong_port, &[], 1)), ["gateway.canary.rankers.dns"]);
        let bad = text.replace("fraction = 0.1", "fraction = 1.1");
        assert_eq!(keys(&check_text(&bad, &[], 1)), ["gateway.canary.fraction"]);
    }

    #[test]
    fn the_admission_rule_counts_every_gateway_replica() {
        let text = "[gateway.rankers]\ndns = \"ranker:50052\"\naddresses = []\nmax_in_flight_per_endpoint = 4\n[ranker]\nlisten = \"0.0.0.0:50052\"\nqueue_capacity = 8\n";
        assert!(check_text(text, &[], 2).problems.is_empty(), "4 x 2 = 8 fits a queue of 8");
        let report = check_text(text, &[], 3);
        assert_eq!(keys(&report), ["gateway.rankers.max_in_flight_per_endpoint"]);
        assert!(report.problems[0].1.contains("12 in flight") && report.problems[0].1.contains("queue_capacity = 8"), "{:?}", report.problems);
        // An override as a Deployment sets it counts like the file.
        assert!(check_text(text, &["LLAMAREC_RANKER__QUEUE_CAPACITY=12"], 3).problems.is_empty());
        // A gateway that calls no ranker has nothing to compare.
        let no_rankers = "[gateway.rankers]\naddresses = []\nmax_in_flight_per_endpoint = 64\n[ranker]\nqueue_capacity = 1\n";
        assert!(check_text(no_rankers, &[], 10).problems.is_empty());
    }

    #[test]
    fn limits_the_gateway_passes_on_must_fit_the_retriever_and_ports_must_agree() {
        let report = check_text(
            "[gateway]\nretriever = \"retriever:6000\"\nmax_history = 2000\n[gateway.retrieve_batching]\nmax_batch = 100\n[retriever]\nlisten = \"0.0.0.0:50051\"\nmax_batch = 64\n",
            &[],
            1,
        );
        assert_eq!(keys(&report), ["gateway.max_history", "gateway.retrieve_batching.max_batch", "gateway.retriever"], "{:#?}", report.problems);
        let ports = check_text("[gateway.rankers]\naddresses = [\"127.0.0.1:7000\"]\n", &[], 1);
        assert_eq!(keys(&ports), ["gateway.rankers.addresses"]);
    }

    #[test]
    fn a_cuda_device_is_a_note_about_the_build_not_a_problem() {
        let report = check_text("[ranker]\ndevice = \"cpu\"\n", &["LLAMAREC_RANKER__DEVICE=cuda:0"], 1);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.notes.len(), usize::from(!BUILT_WITH_CUDA), "{:?}", report.notes);
        assert_eq!(keys(&check_text("[ranker]\ndevice = \"tpu\"\n", &[], 1)), ["ranker.device"]);
    }

    #[test]
    fn shipped_configs_pass() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for file in ["deploy/local/llamarec.toml", "deploy/docker/llamarec.toml"] {
            let layers = ConfigLayers::load_with_env(Some(&root.join(file)), Some(vec![])).unwrap();
            let report = check_layers(&layers, 1);
            assert!(report.problems.is_empty(), "{file}: {:#?}", report.problems);
        }
    }

    #[test]
    fn bad_env_overrides_are_refused_by_name() {
        for bad in ["RANKER__DEVICE=cpu", "LLAMAREC_RANKER__DEVICE", "LLAMAREC_CONFIG=/x"] {
            let err = parse_env(&[bad.to_string()]).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
