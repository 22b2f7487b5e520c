//! Faults with real processes: the ranker slow (a delaying proxy) and killed and restarted under
//! a stream of Recommends, the retriever down, Redis down and back, and acknowledged appends
//! across a gateway crash (kill -9) with both history stores. Assertions are on status codes
//! and flags, never on times; time limits only bound a hang.

use llamarec_proto::v1::gateway_client::GatewayClient;
use llamarec_proto::v1::{AppendEventsRequest, DegradedReason, Event, GetHistoryRequest, RecommendOptions, RecommendRequest, RecommendResponse};
use llamarec_tests::proxy::DelayProxy;
use llamarec_tests::setup::{self, Addrs, Extra, Store};
use llamarec_tests::{wait_serving, Redis};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

async fn client(addr: &str) -> GatewayClient<Channel> {
    GatewayClient::connect(format!("http://{addr}")).await.unwrap()
}

fn recommend(user: &str, k: u32, timeout: Duration, skip_ranker: bool) -> tonic::Request<RecommendRequest> {
    let options = Some(RecommendOptions { num_candidates: 0, skip_ranker });
    let mut r = tonic::Request::new(RecommendRequest { user_id: user.into(), k, options, ..Default::default() });
    r.set_timeout(timeout);
    r
}

fn retriever_order(r: &RecommendResponse) -> bool {
    r.items.iter().map(|i| i.retriever_rank).eq(1..=r.items.len() as u32)
}

fn ev(item: &str, ts: i64) -> Event {
    Event { item_id: item.into(), timestamp_ms: ts }
}

async fn history(client: &mut GatewayClient<Channel>, user: &str) -> Result<Vec<(String, i64)>, tonic::Status> {
    let events = client.get_history(GetHistoryRequest { user_id: user.into(), limit: 0 }).await?.into_inner().events;
    Ok(events.into_iter().map(|e| (e.item_id, e.timestamp_ms)).collect())
}

/// One real ranker behind a delaying proxy. Slow: a Recommend with a short deadline gets the
/// retriever's order flagged RANKER_TIMEOUT, not an error. Killed and restarted during a stream
/// of concurrent Recommends: every call answers, ranked or degraded, and ranking resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_ranker_and_ranker_killed_and_restarted_under_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let proxy = DelayProxy::start(&addrs.ranker, Duration::ZERO).await;
    // reserve_ms: the gateway answers this long before the caller's deadline, so a loaded
    // machine does not turn the degraded answer into the caller's own DEADLINE_EXCEEDED.
    let config = setup::write_config(dir.path(), &addrs, &[&proxy.addr], &Store::Embedded, &Extra { gateway: "reserve_ms = 400", ranker_weight: Some(1.0), ..Default::default() });
    let _retriever = setup::start("retriever", &config);
    let mut ranker = setup::start("ranker", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway, &addrs.ranker] {
        wait_serving(addr, Duration::from_secs(180)).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;
    let r = c.recommend(recommend("42", 10, Duration::from_secs(60), false)).await.unwrap().into_inner();
    assert!(!r.degraded, "through the proxy without delay: ranked ({})", r.degraded_detail);

    // Slow ranker: 3 s each way against a 1.5 s deadline.
    proxy.set_delay(Duration::from_secs(3));
    let r = c.recommend(recommend("42", 10, Duration::from_millis(1500), false)).await.expect("a degraded answer, not an error").into_inner();
    assert!(r.degraded);
    assert_eq!(r.degraded_reason(), DegradedReason::RankerTimeout, "{}", r.degraded_detail);
    assert_eq!(r.items.len(), 10);
    assert!(retriever_order(&r), "the retriever's order");
    assert!(r.ranker_model.is_none() && r.items.iter().all(|i| i.ranker_log_prob.is_none()));
    proxy.set_delay(Duration::ZERO);

    // A stream of concurrent Recommends while the ranker is killed and restarted.
    #[derive(Default)]
    struct Seen {
        ranked_before_kill: usize,
        ranked_after_restart: usize,
        degraded: Vec<DegradedReason>,
        errors: Vec<tonic::Status>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0)); // 0 before kill, 1 killed, 2 restarted
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (seen, phase, stop, addr) = (seen.clone(), phase.clone(), stop.clone(), addrs.gateway.clone());
        workers.push(tokio::spawn(async move {
            let mut c = client(&addr).await;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = ["42", "7", "100"][(w + n) % 3];
                n += 1;
                let sent_in = phase.load(Ordering::SeqCst);
                let outcome = c.recommend(recommend(user, 10, Duration::from_secs(60), false)).await;
                {
                    let mut s = seen.lock().unwrap();
                    match outcome {
                        Ok(r) => {
                            let r = r.into_inner();
                            if r.degraded {
                                s.degraded.push(r.degraded_reason());
                            } else if sent_in == 0 {
                                s.ranked_before_kill += 1;
                            } else if sent_in == 2 {
                                s.ranked_after_restart += 1;
                            }
                        }
                        Err(status) => s.errors.push(status),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let wait_for = |what: &'static str, cond: Box<dyn Fn(&Seen) -> bool + Send>| {
        let seen = seen.clone();
        async move {
            let start = Instant::now();
            while !cond(&seen.lock().unwrap()) {
                assert!(start.elapsed() < Duration::from_secs(240), "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("a ranked answer before the kill", Box::new(|s| s.ranked_before_kill >= 1)).await;
    ranker.kill();
    phase.store(1, Ordering::SeqCst);
    wait_for("degraded answers while the ranker is down", Box::new(|s| s.degraded.len() >= 3)).await;
    ranker = setup::start("ranker", &config);
    wait_serving(&addrs.ranker, Duration::from_secs(180)).await.unwrap();
    phase.store(2, Ordering::SeqCst);
    wait_for("ranking to resume after the restart", Box::new(|s| s.ranked_after_restart >= 2)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let s = seen.lock().unwrap();
    assert!(s.errors.is_empty(), "every Recommend answers while the ranker dies and returns: {:?}", s.errors);
    assert!(s.degraded.contains(&DegradedReason::RankerFailed), "{:?}", s.degraded);
    assert!(
        s.degraded.iter().all(|r| matches!(r, DegradedReason::RankerFailed | DegradedReason::RankerTimeout)),
        "{:?}",
        s.degraded
    );
    eprintln!(
        "ranker kill/restart: {} ranked before, {} degraded, {} ranked after the restart",
        s.ranked_before_kill,
        s.degraded.len(),
        s.ranked_after_restart
    );
    drop(ranker);
}

/// Retriever down with the popularity fallback off: Recommend answers UNAVAILABLE naming the
/// retriever; history calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriever_down_without_fallback_is_unavailable_naming_the_retriever() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let extra = Extra { gateway: "retriever_fallback_items = 0", ..Default::default() };
    let config = setup::write_config(dir.path(), &addrs, &[], &Store::Embedded, &extra);
    let mut retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway] {
        wait_serving(addr, Duration::from_secs(120)).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;
    let r = c.recommend(recommend("42", 10, Duration::from_secs(30), true)).await.unwrap().into_inner();
    assert_eq!(r.items.len(), 10);

    retriever.kill();
    for _ in 0..3 {
        let status = c.recommend(recommend("42", 10, Duration::from_secs(30), true)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("retriever") && status.message().contains(&addrs.retriever), "names the retriever: {}", status.message());
    }
    // Without the ranker stage wanted, the same.
    let status = c.recommend(recommend("42", 10, Duration::from_secs(30), false)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The history side does not need the retriever.
    c.append_events(AppendEventsRequest { user_id: "r-down".into(), events: vec![ev("50", 1)] }).await.unwrap();
    assert_eq!(history(&mut c, "r-down").await.unwrap(), [("50".to_string(), 1)]);
}

/// Retriever killed under a stream of Recommends (the shipped default: the fallback on): not one
/// Recommend fails; once the retriever is gone the answers are the catalog's popular items not
/// in the user's history, flagged RETRIEVER_FALLBACK, with and without the ranker stage wanted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriever_killed_under_a_stream_answers_from_popular_items_and_nothing_fails() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let config = setup::write_config(dir.path(), &addrs, &[], &Store::Embedded, &Extra::default());
    let mut retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway] {
        wait_serving(addr, Duration::from_secs(120)).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Result<RecommendResponse, tonic::Status>>>> = Arc::default();
    let mut streams = Vec::new();
    for s in 0..4 {
        let (stop, outcomes, gateway) = (stop.clone(), outcomes.clone(), addrs.gateway.clone());
        streams.push(tokio::spawn(async move {
            let mut c = client(&gateway).await;
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let user = format!("{}", 1 + (s * 97 + i) % 943);
                let r = c.recommend(recommend(&user, 10, Duration::from_secs(30), i % 2 == 0)).await.map(|r| r.into_inner());
                outcomes.lock().unwrap().push(r);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = outcomes.lock().unwrap().len();
    retriever.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for s in streams {
        s.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    assert!(before_kill > 0 && outcomes.len() > before_kill + 10, "{before_kill} before the kill, {} in all", outcomes.len());
    let failed: Vec<_> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} Recommends failed, e.g. {:?}", failed.len(), outcomes.len(), failed.first());
    let last = outcomes.last().unwrap().as_ref().unwrap();
    assert!(last.degraded && last.degraded_reason == DegradedReason::RetrieverFallback as i32, "{last:?}");
    assert!(last.degraded_detail.contains(&addrs.retriever), "names the retriever: {}", last.degraded_detail);
    assert_eq!(last.items.len(), 10);
    assert_eq!(last.retriever_model.as_ref().map(|m| m.name.as_str()), Some("popularity-fallback"));

    // A user's own history is never recommended back, and the fallback is the same popular list
    // for everyone else.
    let mut c = client(&addrs.gateway).await;
    let seen: Vec<String> = history(&mut c, "1").await.unwrap().into_iter().map(|(id, _)| id).collect();
    let r = c.recommend(recommend("1", 10, Duration::from_secs(30), false)).await.unwrap().into_inner();
    assert_eq!(r.degraded_reason, DegradedReason::RetrieverFallback as i32);
    assert!(r.items.iter().all(|i| !seen.contains(&i.item_id)), "history items recommended back");
    assert!(r.items.windows(2).all(|w| w[0].retriever_score >= w[1].retriever_score), "most popular first");
}

/// Redis down: reads of cached users are served from the gateway's cache (even with a zero TTL:
/// the stale entry beats an error), writes are refused with UNAVAILABLE, uncached users are
/// UNAVAILABLE; after Redis returns, exactly the acknowledged events are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_serves_cached_reads_refuses_writes_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let addrs = Addrs::new();
    let config = setup::write_config(dir.path(), &addrs, &[], &Store::Redis(redis.url()), &Extra { gateway: "cache_ttl_ms = 0", ..Default::default() });
    let _retriever = setup::start("retriever", &config);
    let _gateway = setup::start("gateway", &config);
    for addr in [&addrs.retriever, &addrs.gateway] {
        wait_serving(addr, Duration::from_secs(120)).await.unwrap();
    }
    let mut c = client(&addrs.gateway).await;
    let acked = vec![("50".to_string(), 1), ("181".to_string(), 2)];
    let len = c.append_events(AppendEventsRequest { user_id: "alice".into(), events: vec![ev("50", 1), ev("181", 2)] }).await.unwrap().into_inner().history_length;
    assert_eq!(len, 2);
    assert_eq!(history(&mut c, "alice").await.unwrap(), acked, "read once: now cached");
    let before = c.recommend(recommend("alice", 10, Duration::from_secs(30), true)).await.unwrap().into_inner();

    redis.stop();
    assert_eq!(history(&mut c, "alice").await.unwrap(), acked, "served from the cache while Redis is down");
    let during = c.recommend(recommend("alice", 10, Duration::from_secs(30), true)).await.unwrap().into_inner();
    assert_eq!(during.history_length, 2);
    assert_eq!(during.items.iter().map(|i| &i.item_id).collect::<Vec<_>>(), before.items.iter().map(|i| &i.item_id).collect::<Vec<_>>());

    let refused = c.append_events(AppendEventsRequest { user_id: "alice".into(), events: vec![ev("172", 3)] }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("history store"), "{}", refused.message());
    let mut with_append = recommend("alice", 10, Duration::from_secs(30), true);
    with_append.get_mut().append_events = vec![ev("172", 4)];
    assert_eq!(c.recommend(with_append).await.unwrap_err().code(), Code::Unavailable, "a Recommend that appends is a write");
    let uncached = history(&mut c, "42").await.unwrap_err();
    assert_eq!(uncached.code(), Code::Unavailable, "{uncached:?}");
    assert_eq!(history(&mut c, "alice").await.unwrap(), acked, "a refused write leaves the cached history as it was");

    redis.restart();
    let start = Instant::now();
    while history(&mut c, "42").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "the gateway did not reconnect to Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(history(&mut c, "alice").await.unwrap(), acked, "after Redis returns: the acknowledged events, none of the refused ones");
    let len = c.append_events(AppendEventsRequest { user_id: "alice".into(), events: vec![ev("172", 5)] }).await.unwrap().into_inner().history_length;
    assert_eq!(len, 3, "writes accepted again");
}

/// Writers append one event at a time while the gateway is killed (-9); after a restart every
/// acknowledged event is there, in order (an append in flight at the kill may or may not be).
async fn appends_survive_a_gateway_crash(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let addrs = Addrs::new();
    let config = setup::write_config(dir.path(), &addrs, &[], &store, &Extra::default());
    let mut gateway = setup::start("gateway", &config);
    wait_serving(&addrs.gateway, Duration::from_secs(120)).await.unwrap();

    let items = ["50", "181", "172", "1", "100", "258", "127", "174"];
    // Per writer, the (item id, timestamp) events the gateway acknowledged.
    type Acked = Arc<Mutex<Vec<Vec<(String, i64)>>>>;
    let acked: Acked = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acked, addr) = (acked.clone(), addrs.gateway.clone());
        writers.push(tokio::spawn(async move {
            let mut c = client(&addr).await;
            for n in 0.. {
                let event = (items[n % items.len()].to_string(), n as i64 + 1);
                match c.append_events(AppendEventsRequest { user_id: format!("crash-{w}"), events: vec![ev(&event.0, event.1)] }).await {
                    Ok(r) => {
                        let mut a = acked.lock().unwrap();
                        a[w].push(event);
                        assert_eq!(r.into_inner().history_length as usize, a[w].len());
                    }
                    Err(_) => return, // the gateway is gone
                }
            }
        }));
    }
    let start = Instant::now();
    while acked.lock().unwrap().iter().any(|a| a.len() < 5) {
        assert!(start.elapsed() < Duration::from_secs(60), "writers made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.kill();
    for w in writers {
        w.await.unwrap();
    }
    let _gateway = setup::start("gateway", &config);
    wait_serving(&addrs.gateway, Duration::from_secs(120)).await.unwrap();
    let mut c = client(&addrs.gateway).await;
    let acked = acked.lock().unwrap().clone();
    for (w, acked) in acked.iter().enumerate() {
        let stored = history(&mut c, &format!("crash-{w}")).await.unwrap();
        assert!(stored.len() >= acked.len() && stored.len() <= acked.len() + 1, "user crash-{w}: {} stored, {} acknowledged", stored.len(), acked.len());
        assert_eq!(&stored[..acked.len()], &acked[..], "user crash-{w}: acknowledged events, in order");
    }
    eprintln!("acknowledged before the kill: {:?}", acked.iter().map(Vec::len).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_gateway_crash_with_redis() {
    let redis = Redis::start();
    appends_survive_a_gateway_crash(Store::Redis(redis.url())).await;
    drop(redis); // kept up until here: only the gateway crashed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_gateway_crash_embedded() {
    appends_survive_a_gateway_crash(Store::Embedded).await;
}
