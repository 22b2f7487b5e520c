//! Configuration files and process start-up shared by the cross-process cluster tests.

use crate::{binary, free_port, Process};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Loopback addresses of one cluster.
pub struct Addrs {
    /// Retriever gRPC.
    pub retriever: String,
    /// Ranker gRPC.
    pub ranker: String,
    /// Gateway gRPC.
    pub gateway: String,
    /// Ranker Prometheus port.
    pub ranker_metrics: u16,
    /// Gateway Prometheus port.
    pub gateway_metrics: u16,
    retriever_metrics: u16,
}

impl Addrs {
    /// Free ports for everything.
    pub fn new() -> Self {
        let a = || format!("127.0.0.1:{}", free_port());
        Self { retriever: a(), ranker: a(), gateway: a(), ranker_metrics: free_port(), gateway_metrics: free_port(), retriever_metrics: free_port() }
    }
}

impl Default for Addrs {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the gateway keeps histories.
pub enum Store {
    /// An embedded redb file in the test's directory.
    Embedded,
    /// Redis at this URL.
    Redis(String),
}

/// Extra `key = value` lines for each section.
#[derive(Default)]
pub struct Extra<'a> {
    /// `[telemetry] log_level`; `"error"` when `None`.
    pub log_level: Option<&'a str>,
    /// Inside `[retriever]`.
    pub retriever: &'a str,
    /// Inside `[ranker]`.
    pub ranker: &'a str,
    /// Inside `[gateway]`.
    pub gateway: &'a str,
    /// `[gateway] ranker_weight`; `None` leaves the compiled-in default (0: Recommend never
    /// calls the ranker). Tests that need ranked answers set it.
    pub ranker_weight: Option<f32>,
    /// Inside `[gateway.rankers]`.
    pub gateway_rankers: &'a str,
}

/// Writes `DIR/cluster.toml` and returns its path: the three services on `addrs`, the gateway
/// calling the rankers at `rankers` (a proxy, say) with the given store and extra keys.
pub fn write_config(dir: &Path, addrs: &Addrs, rankers: &[&str], store: &Store, extra: &Extra) -> String {
    let store = match store {
        Store::Embedded => format!("kind = \"embedded\"\npath = \"{}\"", dir.join("histories.redb").display()),
        Store::Redis(url) => format!("kind = \"redis\"\nurl = \"{url}\"\nprefix = \"t\""),
    };
    let rankers = rankers.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ");
    let weight = extra.ranker_weight.map(|w| format!("ranker_weight = {w:?}")).unwrap_or_default();
    let text = format!(
        r#"
[telemetry]
log_level = "{log_level}"

[retriever]
listen = "{retriever}"
metrics_listen = "127.0.0.1:{rm}"
{retriever_extra}

[ranker]
listen = "{ranker}"
metrics_listen = "127.0.0.1:{km}"
{ranker_extra}

[gateway]
listen = "{gateway}"
metrics_listen = "127.0.0.1:{gm}"
retriever = "{retriever}"
{weight}
{gateway_extra}

[gateway.rankers]
addresses = [{rankers}]
eject_ms = 100
{rankers_extra}

[gateway.store]
{store}
"#,
        retriever = addrs.retriever,
        ranker = addrs.ranker,
        gateway = addrs.gateway,
        rm = addrs.retriever_metrics,
        km = addrs.ranker_metrics,
        gm = addrs.gateway_metrics,
        retriever_extra = extra.retriever,
        ranker_extra = extra.ranker,
        gateway_extra = extra.gateway,
        rankers_extra = extra.gateway_rankers,
        log_level = extra.log_level.unwrap_or("error"),
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write the config");
    path.display().to_string()
}

/// Starts `service` ("retriever", "ranker" or "gateway") with `config`.
pub fn start(service: &str, config: &str) -> Process {
    let bin = match service {
        "retriever" => "retriever-service",
        "ranker" => "ranker-service",
        "gateway" => "gateway",
        other => panic!("unknown service {other}"),
    };
    Process::start(service, &binary(bin), &["--config", config], &[])
}

/// The text of `http://127.0.0.1:PORT/metrics`, or empty when nothing answers.
pub fn scrape(port: u16) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// The value of an unlabelled metric in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Every series of the gauge or counter `metric` on `http://127.0.0.1:PORT/metrics`, as (the
/// line up to its value, value); e.g. `("llamarec_ranker_model_info{version=\"..\",label=\"..\"}", 1.0)`.
pub fn series(port: u16, metric: &str) -> Vec<(String, f64)> {
    scrape(port)
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}
