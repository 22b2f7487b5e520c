//! The gateway's canary split (issue 20 item 3) across processes: users are split between the
//! stable arm and the canary by a sticky hash of their id, as `gateway::canary::arm_of` says;
//! the split is read and changed at run time by the admin RPCs GetSplit/SetSplit (and `llamarec
//! split`), which need an admin token; the canary arm's answers are ranked by the canary's pods
//! with the canary's weight and report that ranker's version; the traffic record keeps the arm
//! and versions of every answer, and `llamarec traffic hit-rate` reads them back per arm.
//!
//! Cheap on purpose: the stable arm runs at weight 0 against a ranker address where nothing
//! listens (a proxy that counts connections), so only the few canary requests of the second test
//! reach the real LLM.

use gateway::canary::{arm_of, Arm};
use gateway::traffic::read_traffic;
use llamarec_common::fusion::{fused_score, log_softmax};
use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::ranker_client::RankerClient;
use llamarec_proto::v1::{CanarySplit, Event, GetSplitRequest, InfoRequest, RecommendOptions, RecommendRequest, RecommendResponse, SetSplitRequest};
use llamarec_tests::proxy::DelayProxy;
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{binary, free_port, repo_root, wait_serving};
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

const ADMIN_TOKEN: &str = "canary-admin-token-for-tests";
const PATIENCE: Duration = Duration::from_secs(180);

async fn client(addr: &str) -> GatewayClient<Channel> {
    GatewayClient::connect(format!("http://{addr}")).await.unwrap()
}

fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn get_split(c: &mut GatewayClient<Channel>, token: Option<&str>) -> Result<CanarySplit, Status> {
    c.get_split(authorized(GetSplitRequest {}, token)).await.map(|r| r.into_inner().split.unwrap())
}

async fn set_split(c: &mut GatewayClient<Channel>, fraction: Option<f64>, weight: Option<f32>) -> Result<(CanarySplit, CanarySplit), Status> {
    let r = c.set_split(authorized(SetSplitRequest { fraction, canary_ranker_weight: weight }, Some(ADMIN_TOKEN))).await?.into_inner();
    Ok((r.previous.unwrap(), r.current.unwrap()))
}

async fn recommend(c: &mut GatewayClient<Channel>, user: &str, k: u32, events: &[&str]) -> RecommendResponse {
    let mut r = tonic::Request::new(RecommendRequest {
        user_id: user.into(),
        k,
        append_events: events.iter().map(|e| Event { item_id: e.to_string(), timestamp_ms: 0 }).collect(),
        options: Some(RecommendOptions::default()),
        ..Default::default()
    });
    r.set_timeout(Duration::from_secs(60));
    c.recommend(r).await.unwrap_or_else(|s| panic!("Recommend for {user}: {s:?}")).into_inner()
}

/// Writes the admin tokens file and returns the `[gateway]` keys of a split: `fraction` of users
/// at `canary_weight` on `canary_rankers`, and every request captured to `traffic`.
fn gateway_keys(dir: &Path, fraction: f64, canary_weight: f32, canary_rankers: &str, traffic: &Path) -> String {
    let tokens = dir.join("admin-tokens");
    std::fs::write(&tokens, format!("# operators\n{ADMIN_TOKEN}\n")).unwrap();
    format!(
        "admin_tokens_file = \"{}\"\ntraffic = {{ sample_rate = 1.0, path = \"{}\" }}\n\
         canary = {{ fraction = {fraction:?}, ranker_weight = {canary_weight:?}, rankers = {{ addresses = [\"{canary_rankers}\"], eject_ms = 100 }} }}\n",
        tokens.display(),
        traffic.display()
    )
}

/// `llamarec ARGS` in the repository root, without the caller's admin token in the environment.
fn llamarec(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(binary("llamarec"));
    cmd.args(args).current_dir(repo_root()).env_remove("LLAMAREC_ADMIN_TOKEN").env_remove("LLAMAREC_TLS_CA");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// No ranker runs: both arms at weight 0. The arm of every user is `arm_of(user, fraction)`,
/// the same on every call, and follows SetSplit at once; re-setting a fraction puts everyone
/// back where they were. The admin RPCs refuse missing and wrong tokens (and everything on a
/// gateway without admin tokens), and bad values by name. Traffic records carry the arms, and
/// `llamarec traffic hit-rate` counts a later appended recommendation as a hit of its arm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_is_sticky_settable_at_run_time_and_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let dead_ranker = DelayProxy::start(&format!("127.0.0.1:{}", free_port()), Duration::ZERO).await;
    let traffic = dir.path().join("traffic.jsonl");
    let keys = gateway_keys(dir.path(), 0.3, 0.0, &dead_ranker.addr, &traffic);
    let extra = Extra { log_level: Some("warn"), gateway: &keys, ranker_weight: Some(0.0), ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[&dead_ranker.addr], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway] {
        wait_serving(addr, PATIENCE).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;

    // (c) The admin RPCs: a missing or wrong token is UNAUTHENTICATED, the right one reads.
    for token in [None, Some("not-the-admin-token")] {
        let status = get_split(&mut c, token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}: {status:?}");
        let status = c.set_split(authorized(SetSplitRequest { fraction: Some(1.0), canary_ranker_weight: None }, token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}: {status:?}");
    }
    let split = get_split(&mut c, Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!((split.fraction, split.canary_ranker_weight, split.stable_ranker_weight), (0.3, 0.0, 0.0));
    assert_eq!(split.canary_rankers, std::slice::from_ref(&dead_ranker.addr));
    // Bad values: INVALID_ARGUMENT naming the field, and nothing changes.
    for (fraction, weight, field) in [(Some(1.5), None, "fraction"), (Some(-0.1), None, "fraction"), (None, Some(2.0), "canary_ranker_weight")] {
        let status = set_split(&mut c, fraction, weight).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    assert_eq!(get_split(&mut c, Some(ADMIN_TOKEN)).await.unwrap(), split);

    // (a) Each user's arm is the hash's, on every call.
    let users: Vec<String> = (1..=40).map(|i| (i * 23).to_string()).collect();
    let arms_at = |fraction: f64| users.iter().map(|u| arm_of(u, fraction).as_str()).collect::<Vec<_>>();
    let expected = arms_at(0.3);
    assert!(expected.contains(&"canary") && expected.contains(&"stable"), "both arms among 40 users at 0.3: {expected:?}");
    let mut served = Vec::new();
    for u in &users {
        let r = recommend(&mut c, u, 5, &[]).await;
        assert!(!r.degraded && r.ranker_model.is_none(), "both arms at weight 0: {r:?}");
        served.push(r.arm);
    }
    assert_eq!(served, expected);
    for u in users.iter().take(10) {
        assert_eq!(recommend(&mut c, u, 5, &[]).await.arm, arm_of(u, 0.3).as_str(), "user {u} changed arm");
    }

    // (d) The split changes at run time, for the next request.
    let (before, after) = set_split(&mut c, Some(0.0), None).await.unwrap();
    assert_eq!((before.fraction, after.fraction), (0.3, 0.0));
    for u in users.iter().take(10) {
        assert_eq!(recommend(&mut c, u, 5, &[]).await.arm, "stable");
    }
    set_split(&mut c, Some(1.0), Some(0.0)).await.unwrap();
    for u in users.iter().take(10) {
        assert_eq!(recommend(&mut c, u, 5, &[]).await.arm, "canary");
    }
    // Back to 0.3: everyone is where it was (sticky across re-setting).
    set_split(&mut c, Some(0.3), None).await.unwrap();
    let mut again = Vec::new();
    for u in &users {
        again.push(recommend(&mut c, u, 5, &[]).await.arm);
    }
    assert_eq!(again, expected);

    // `llamarec split`: reads, then sets, printing before and after (token from the environment).
    let addr = addrs.gateway.as_str();
    let out = llamarec(&["split", "--addr", addr], &[("LLAMAREC_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("canary fraction 0.3 (ranker_weight 0"), "{stdout}");
    let out = llamarec(&["split", "--addr", addr, "--admin-token", ADMIN_TOKEN, "--fraction", "0.3", "--canary-weight", "0.25"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("before: canary fraction 0.3 (ranker_weight 0,") && stdout.contains("after:  canary fraction 0.3 (ranker_weight 0.25,"), "{stdout}");
    let out = llamarec(&["split", "--addr", addr, "--admin-token", "wrong-token-here", "--fraction", "1"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"), "{}", String::from_utf8_lossy(&out.stderr));
    set_split(&mut c, None, Some(0.0)).await.unwrap();

    // A later request appending an item recommended before is a hit of the first request's arm.
    let (canary_user, stable_user) =
        (users.iter().find(|u| arm_of(u, 0.3) == Arm::Canary).unwrap(), users.iter().find(|u| arm_of(u, 0.3) == Arm::Stable).unwrap());
    for u in [canary_user, stable_user] {
        let first = recommend(&mut c, u, 5, &[]).await;
        recommend(&mut c, u, 5, &[&first.items[0].item_id]).await;
    }
    assert_eq!(dead_ranker.connections(), 0, "no arm called a ranker at weight 0");

    // Per-arm metrics.
    let page = setup::scrape(addrs.gateway_metrics);
    let count = |arm: &str| setup::metric(&page, &format!("llamarec_gateway_recommend_duration_seconds_count{{arm=\"{arm}\"}}")).unwrap_or(0.0);
    let canary_served = expected.iter().filter(|a| **a == "canary").count() * 2 + 10 + 2; // two passes, all-canary, hit requests
    assert!(count("canary") >= canary_served as f64, "{page}");
    assert!(count("stable") >= 10.0 && count("canary") + count("stable") >= (users.len() * 2 + 30 + 4) as f64, "{page}");
    assert_eq!(setup::metric(&page, "llamarec_gateway_canary_fraction"), Some(0.3), "{page}");

    // The traffic record: every answer with its arm and retriever version.
    let mut records = Vec::new();
    for _ in 0..250 {
        records = read_traffic(&traffic).unwrap_or_default();
        if records.len() >= users.len() * 2 + 34 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(records.len(), users.len() * 2 + 34, "every Recommend captured");
    for r in &records {
        let o = r.outcome.as_ref().expect("an outcome");
        assert_eq!(o.code, "Ok");
        assert!(o.arm == "stable" || o.arm == "canary");
        assert!(o.retriever_model.is_some() && o.ranker_model.is_none() && o.items.len() == 5, "{o:?}");
    }
    let out = llamarec(&["--config", &config, "traffic", "hit-rate", "--traffic", traffic.to_str().unwrap(), "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for arm in ["canary", "stable"] {
        let row = report["by_arm"].as_array().unwrap().iter().find(|r| r["arm"] == arm).unwrap_or_else(|| panic!("{report}"));
        assert!(row["hits"].as_u64().unwrap() >= 1, "{arm}: {row}");
    }

    // The canary degrades like the stable arm: its pods unreachable (the dead proxy) at a canary
    // weight above 0, its users get the retriever's order, flagged, counted under its arm.
    set_split(&mut c, Some(1.0), Some(0.5)).await.unwrap();
    let d = recommend(&mut c, "42", 5, &[]).await;
    assert_eq!(d.arm, "canary");
    assert!(d.degraded && d.degraded_reason != 0 && d.ranker_model.is_none() && d.items.len() == 5, "{d:?}");
    assert_eq!(d.items.iter().map(|i| i.retriever_rank).collect::<Vec<_>>(), [1, 2, 3, 4, 5], "the retriever's order");
    let page = setup::scrape(addrs.gateway_metrics);
    let degraded: Vec<&str> = page.lines().filter(|l| l.starts_with("llamarec_gateway_degraded_total{")).collect();
    assert!(degraded.len() == 1 && degraded[0].contains("arm=\"canary\"") && degraded[0].ends_with(" 1"), "{degraded:?}");
    set_split(&mut c, Some(0.3), Some(0.0)).await.unwrap();

    // A gateway without admin tokens refuses the admin RPCs outright, whatever the token.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = Addrs::new();
    other.retriever = addrs.retriever.clone();
    let extra = Extra { log_level: Some("warn"), ranker_weight: Some(0.0), ..Default::default() };
    let other_config = setup::write_config(other_dir.path(), &other, &[&dead_ranker.addr], &Store::Embedded, &extra);
    let _other_gateway = setup::start("gateway", &other_config);
    wait_serving(&other.gateway, PATIENCE).await.unwrap();
    let mut o = client(&other.gateway).await;
    for token in [None, Some(ADMIN_TOKEN)] {
        assert_eq!(get_split(&mut o, token).await.unwrap_err().code(), Code::PermissionDenied);
    }
    let status = o.set_split(authorized(SetSplitRequest { fraction: Some(0.5), canary_ranker_weight: None }, Some(ADMIN_TOKEN))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("admin_tokens_file"), "{status:?}");
    assert_eq!(recommend(&mut o, "42", 5, &[]).await.arm, "stable", "no canary configured");
}

/// (b) A real ranker behind the canary arm only: a canary user's answer is ranked by it, with
/// the canary's weight, and reports its version; a stable user's (weight 0) calls no ranker and
/// has no ranker version; at canary weight 0 the canary arm stops calling the ranker too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_arm_is_ranked_by_its_pods_with_its_weight() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let dead_ranker = DelayProxy::start(&format!("127.0.0.1:{}", free_port()), Duration::ZERO).await;
    let canary_proxy = DelayProxy::start(&addrs.ranker, Duration::ZERO).await;
    let traffic = dir.path().join("traffic.jsonl");
    let keys = gateway_keys(dir.path(), 0.3, 0.5, &canary_proxy.addr, &traffic);
    let extra = Extra { log_level: Some("warn"), gateway: &keys, ranker_weight: Some(0.0), ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[&dead_ranker.addr], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let _ranker = setup::start("ranker", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.ranker, &addrs.gateway] {
        wait_serving(addr, PATIENCE).await.unwrap();
    }
    let ranker_version = RankerClient::connect(format!("http://{}", addrs.ranker)).await.unwrap().info(InfoRequest {}).await.unwrap().into_inner().model.unwrap();
    let users: Vec<String> = (1..=943).map(|i| i.to_string()).collect();
    let canary_user = users.iter().find(|u| arm_of(u, 0.3) == Arm::Canary).unwrap();
    let stable_user = users.iter().find(|u| arm_of(u, 0.3) == Arm::Stable).unwrap();
    let mut c = client(&addrs.gateway).await;

    // The canary user: ranked (k = N = 20, so every candidate's retriever score is in the
    // answer), fused at the canary's 0.5, with the canary ranker's version.
    let r = recommend(&mut c, canary_user, 20, &[]).await;
    assert_eq!(r.arm, "canary");
    assert!(!r.degraded, "{:?}: {}", r.degraded_reason(), r.degraded_detail);
    assert_eq!(r.ranker_model.as_ref(), Some(&ranker_version), "the canary pods' version");
    assert!(r.timings.unwrap().rank_us > 0);
    let mut by_rank = r.items.clone();
    by_rank.sort_by_key(|i| i.retriever_rank);
    let retriever_lp = log_softmax(&by_rank.iter().map(|i| i.retriever_score).collect::<Vec<_>>());
    for (item, r_lp) in by_rank.iter().zip(retriever_lp) {
        let lp = item.ranker_log_prob.expect("ranked");
        assert!((item.final_score - fused_score(0.5, r_lp, lp)).abs() < 1e-4, "item {}: {} vs fused at 0.5 {}", item.item_id, item.final_score, fused_score(0.5, r_lp, lp));
    }
    assert!(canary_proxy.connections() >= 1);

    // The stable user: weight 0, no ranker called, no version.
    let s = recommend(&mut c, stable_user, 10, &[]).await;
    assert_eq!(s.arm, "stable");
    assert!(!s.degraded && s.ranker_model.is_none() && s.items.iter().all(|i| i.ranker_log_prob.is_none()), "{s:?}");
    assert_eq!(s.timings.unwrap().rank_us, 0);
    assert_eq!(dead_ranker.connections(), 0, "the stable arm's rankers are never called at weight 0");

    // Canary weight 0: the canary arm no longer calls its ranker either (the weight is per arm).
    set_split(&mut c, None, Some(0.0)).await.unwrap();
    let z = recommend(&mut c, canary_user, 10, &[]).await;
    assert_eq!(z.arm, "canary");
    assert!(!z.degraded && z.ranker_model.is_none() && z.timings.unwrap().rank_us == 0, "{z:?}");
    let ranker_ok = setup::metric(&setup::scrape(addrs.ranker_metrics), "llamarec_ranker_requests_total{status=\"Ok\"}");
    assert_eq!(ranker_ok, Some(1.0), "one Rank call in all: the canary user's at weight 0.5");

    // The traffic record keeps the canary's ranker version and weight beside the arm.
    let mut records = Vec::new();
    for _ in 0..250 {
        records = read_traffic(&traffic).unwrap_or_default();
        if records.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes: Vec<_> = records.iter().map(|r| r.outcome.clone().expect("an outcome")).collect();
    assert_eq!(outcomes.iter().map(|o| (o.arm.as_str(), o.ranker_weight)).collect::<Vec<_>>(), [("canary", 0.5), ("stable", 0.0), ("canary", 0.0)]);
    let ranked = outcomes[0].ranker_model.as_ref().expect("the ranker's version");
    assert_eq!((ranked.name.as_str(), ranked.version.as_str()), (ranker_version.name.as_str(), ranker_version.version.as_str()));
    assert!(outcomes[1].ranker_model.is_none() && outcomes[2].ranker_model.is_none());
}

/// With caller tokens on (`[gateway.auth]`), an admin token also passes the callers' check (one
/// `authorization` header carries one token), so an operator needs only it; a caller's token
/// does not open the admin RPCs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_passes_the_caller_check_and_a_caller_token_is_no_admin() {
    const CALLER_TOKEN: &str = "caller-token-for-canary-tests";
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let dead_ranker = DelayProxy::start(&format!("127.0.0.1:{}", free_port()), Duration::ZERO).await;
    let traffic = dir.path().join("traffic.jsonl");
    let keys = format!("{}auth = {{ tokens = [\"{CALLER_TOKEN}\"] }}\n", gateway_keys(dir.path(), 0.5, 0.0, &dead_ranker.addr, &traffic));
    let extra = Extra { log_level: Some("warn"), gateway: &keys, ranker_weight: Some(0.0), ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[&dead_ranker.addr], &Store::Embedded, &extra);
    let _retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway] {
        wait_serving(addr, PATIENCE).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;
    let recommend_with = |token: Option<&str>| authorized(RecommendRequest { user_id: "42".into(), k: 3, ..Default::default() }, token);

    assert_eq!(c.recommend(recommend_with(None)).await.unwrap_err().code(), Code::Unauthenticated, "callers need a token");
    assert_eq!(c.recommend(recommend_with(Some(CALLER_TOKEN))).await.unwrap().into_inner().items.len(), 3);
    assert_eq!(c.recommend(recommend_with(Some(ADMIN_TOKEN))).await.unwrap().into_inner().items.len(), 3, "an admin token is a caller too");

    let status = get_split(&mut c, Some(CALLER_TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "a caller token is no admin token: {status:?}");
    assert!(status.message().contains("gateway admin"), "{status:?}");
    assert_eq!(get_split(&mut c, Some(ADMIN_TOKEN)).await.unwrap().fraction, 0.5);
    let (before, after) = set_split(&mut c, Some(0.25), Some(0.75)).await.unwrap();
    assert_eq!((before.fraction, before.canary_ranker_weight, after.fraction, after.canary_ranker_weight), (0.5, 0.0, 0.25, 0.75));
}
