//! Traffic capture and replay across processes: a real gateway (and retriever; retriever-only
//! traffic, so no ranker) records what it is sent, `llamarec traffic synth` writes a traffic
//! file, and `llamarec replay` drives the gateway from it and from the capture.

use gateway::traffic::{read_traffic, TrafficRecord};
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{Event, InlineHistory, RecommendOptions, RecommendRequest};
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{binary, repo_root, wait_serving};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn llamarec(args: &[&str]) {
    let status = std::process::Command::new(binary("llamarec")).args(args).current_dir(repo_root()).status().unwrap();
    assert!(status.success(), "llamarec {args:?} failed");
}

/// The JSON report of `llamarec replay --json` (its type is the CLI's load generator's).
fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A count in the report, e.g. `count(&r, &["latency", "count"])`.
fn count(report: &Value, path: &[&str]) -> u64 {
    path.iter().fold(report, |v, k| &v[*k]).as_u64().unwrap_or_else(|| panic!("{path:?} is not a count in {report}"))
}

fn ms(report: &Value, path: &[&str]) -> f64 {
    path.iter().fold(report, |v, k| &v[*k]).as_f64().unwrap_or_else(|| panic!("{path:?} is not a number in {report}"))
}

/// Waits (without a time limit on the gateway's speed: only to stop a broken test) until the
/// capture holds `n` records.
fn captured(path: &Path, n: usize) -> Vec<TrafficRecord> {
    for _ in 0..1000 {
        if let Ok(records) = read_traffic(path) {
            if records.len() >= n {
                return records;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the capture {} never held {n} records", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_synth_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let traffic_path = dir.path().join("captured/traffic.jsonl");
    let addrs = Addrs::new();
    let capture = format!("traffic = {{ sample_rate = 1.0, path = \"{}\" }}", traffic_path.display());
    let extra = Extra { log_level: Some("warn"), gateway: &capture, ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    let gateway_addr = &addrs.gateway;
    for addr in [&addrs.retriever, gateway_addr] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }

    // 1. Capture: every request (sample_rate 1.0), as sent, in arrival order, rejected ones too.
    let mut client = GatewayClient::connect(format!("http://{gateway_addr}")).await.unwrap();
    let options = |n: u32| Some(RecommendOptions { num_candidates: n, skip_ranker: true });
    let sent = vec![
        RecommendRequest { user_id: "1".into(), k: 5, options: options(0), ..Default::default() },
        RecommendRequest { user_id: "2".into(), k: 7, options: options(12), ..Default::default() },
        RecommendRequest { user_id: "inline".into(), k: 3, inline_history: Some(InlineHistory { item_ids: vec!["50".into(), "181".into()] }), options: options(0), ..Default::default() },
        RecommendRequest { user_id: "3".into(), k: 4, append_events: vec![Event { item_id: "50".into(), timestamp_ms: 1_700_000_000_000 }], options: options(0), ..Default::default() },
        // Invalid (k = 0): answered INVALID_ARGUMENT, still captured as offered.
        RecommendRequest { user_id: "4".into(), k: 0, options: options(0), ..Default::default() },
    ];
    for (i, req) in sent.iter().enumerate() {
        let mut request = tonic::Request::new(req.clone());
        request.set_timeout(Duration::from_millis(30_000 + i as u64));
        let result = client.recommend(request).await;
        if req.k == 0 {
            assert_eq!(result.unwrap_err().code(), tonic::Code::InvalidArgument);
        } else {
            assert_eq!(result.unwrap().into_inner().items.len(), req.k as usize);
        }
    }
    let records = captured(&traffic_path, sent.len());
    assert_eq!(records.len(), sent.len());
    for (i, (record, req)) in records.iter().zip(&sent).enumerate() {
        assert_eq!(&record.to_request(), req, "record {i} replays the request as sent");
        assert_eq!(record.deadline_ms, Some(30_000 + i as u64), "the caller's deadline");
        assert!(record.unix_ms.is_some());
    }
    assert!(records.windows(2).all(|w| w[0].offset_ms <= w[1].offset_ms && w[0].unix_ms <= w[1].unix_ms));

    // 2. Synthetic traffic from the data set's users, Poisson arrivals, retriever only.
    let synth = dir.path().join("synth.jsonl");
    let synth_s = synth.display().to_string();
    llamarec(&["--config", &config, "traffic", "synth", "--out", &synth_s, "--rate", "40", "--duration", "3", "--skip-ranker-share", "1", "--seed", "7"]);
    let synthetic = read_traffic(&synth).unwrap();
    assert!(!synthetic.is_empty());
    assert!(synthetic.iter().all(|r| r.skip_ranker && r.k == 10 && r.inline_history.is_none() && r.unix_ms.is_none()));
    assert!(synthetic.iter().all(|r| r.offset_ms < 3_000.0));
    assert!(synthetic.iter().all(|r| r.user_id.parse::<u32>().is_ok_and(|u| (1..=943).contains(&u))), "ML-100K user ids");

    // 3. Replay it at the recorded rate, sped up, over three connections: every request answered.
    let json = dir.path().join("report.json");
    let json_s = json.display().to_string();
    llamarec(&["--config", &config, "replay", "--traffic", &synth_s, "--gateway", gateway_addr, "--speed", "2", "--connections", "3", "--json", &json_s]);
    let r = report(&json);
    assert_eq!(count(&r, &["sent"]), synthetic.len() as u64);
    assert_eq!(count(&r, &["sent"]), count(&r, &["completed"]) + count(&r, &["errors"]));
    assert_eq!(count(&r, &["errors"]), 0, "{}", r["errors_by_code"]);
    assert!(r["errors_by_code"].as_object().unwrap().is_empty());
    assert_eq!(count(&r, &["degraded"]), 0, "retriever-only answers are not degraded");
    assert_eq!(count(&r, &["latency", "count"]), count(&r, &["completed"]));
    assert_eq!(count(&r, &["connections"]), 3);
    assert!(ms(&r, &["latency", "p50_ms"]) <= ms(&r, &["latency", "p99_ms"]) && ms(&r, &["latency", "p99_ms"]) <= ms(&r, &["latency", "max_ms"]));

    // The gateway captured the replayed requests too: the synthetic ones after the first five.
    let recaptured = captured(&traffic_path, sent.len() + synthetic.len());
    let mut replayed: Vec<_> = recaptured[sent.len()..].iter().map(|r| (r.user_id.clone(), r.k)).collect();
    let mut expected: Vec<_> = synthetic.iter().map(|r| (r.user_id.clone(), r.k)).collect();
    replayed.sort();
    expected.sort();
    assert_eq!(replayed, expected);

    // 4. The gateway's own capture replays at a fixed rate, cycling through its requests: one
    //    of every five is the invalid one, answered INVALID_ARGUMENT and counted by code.
    let capture_copy = dir.path().join("capture-copy.jsonl");
    std::fs::write(&capture_copy, records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect::<String>()).unwrap();
    let capture_s = capture_copy.display().to_string();
    llamarec(&["--config", &config, "replay", "--traffic", &capture_s, "--gateway", gateway_addr, "--rate", "20", "--duration", "1", "--arrivals", "uniform", "--json", &json_s]);
    let r = report(&json);
    assert_eq!(count(&r, &["sent"]), 20);
    assert_eq!(count(&r, &["completed"]), 16);
    assert_eq!(count(&r, &["errors"]), 4);
    assert_eq!(count(&r, &["errors_by_code", "InvalidArgument"]), 4, "{}", r["errors_by_code"]);
}
