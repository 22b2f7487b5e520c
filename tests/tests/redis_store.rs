//! The Redis history store against a real redis-server.

use gateway::history::{HistoryStore, RedisStore, StoredEvent};
use llamarec_tests::Redis;
use std::time::{Duration, Instant};

fn ev(item: &str, ts: i64) -> StoredEvent {
    StoredEvent { item_id: item.into(), timestamp_ms: ts }
}

#[tokio::test]
async fn appends_reads_seeds_and_survives_a_redis_restart() {
    let mut redis = Redis::start();
    let store = RedisStore::connect(&redis.url(), "t").await.unwrap();
    assert_eq!(store.append("u1", &[ev("a", 1), ev("b", 2)]).await.unwrap(), 2);
    assert_eq!(store.append("u1", &[ev("c", 3)]).await.unwrap(), 3);
    assert!(store.seed_once(vec![("u2".into(), vec![ev("x", 5)])]).await.unwrap());
    assert!(!store.seed_once(vec![("u2".into(), vec![ev("y", 6)])]).await.unwrap(), "seeding happens once");

    // Acknowledged writes are on disk (appendfsync always): a crash of Redis loses none.
    redis.restart();
    let reconnected = RedisStore::connect(&redis.url(), "t").await.unwrap();
    assert_eq!(reconnected.read("u1").await.unwrap(), vec![ev("a", 1), ev("b", 2), ev("c", 3)]);
    assert_eq!(reconnected.read("u2").await.unwrap(), vec![ev("x", 5)]);
    // The first connection manager reconnects by itself.
    let mut ok = false;
    for _ in 0..50 {
        if store.read("u1").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "connection manager did not reconnect");
}

#[tokio::test]
async fn redis_down_refuses_writes_quickly() {
    let mut redis = Redis::start();
    let store = RedisStore::connect(&redis.url(), "t").await.unwrap();
    store.append("u", &[ev("a", 1)]).await.unwrap();
    redis.stop();
    let start = Instant::now();
    let err = store.append("u", &[ev("b", 2)]).await.unwrap_err();
    assert!(err.to_string().contains("redis"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "refusal took {:?}", start.elapsed());
}

#[tokio::test]
async fn appends_keep_the_newest_max_history_events() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url(), "t").await.unwrap().with_max_history(3);
    assert_eq!(store.append("u", &[ev("a", 1), ev("b", 2)]).await.unwrap(), 2);
    assert_eq!(store.append("u", &[ev("c", 3), ev("d", 4)]).await.unwrap(), 3, "the length after trimming");
    assert_eq!(store.read("u").await.unwrap(), vec![ev("b", 2), ev("c", 3), ev("d", 4)]);
    let many: Vec<StoredEvent> = (10..15).map(|i| ev(&i.to_string(), i)).collect();
    assert_eq!(store.append("u", &many).await.unwrap(), 3);
    assert_eq!(store.read("u").await.unwrap(), many[2..].to_vec());
    assert_eq!(store.append("u1", &[ev("z", 9)]).await.unwrap(), 1, "other users are untouched");
    // Seeding is capped too.
    assert!(store.seed_once(vec![("s".into(), many.clone())]).await.unwrap());
    assert_eq!(store.read("s").await.unwrap(), many[2..].to_vec());
    // Without a cap nothing is dropped.
    let open = RedisStore::connect(&redis.url(), "t").await.unwrap();
    assert_eq!(open.append("u", &many).await.unwrap(), 8);
}
