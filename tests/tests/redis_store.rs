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

/// `redis-cli -p PORT args...`, its output trimmed.
fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli").arg("-p").arg(redis.port.to_string()).args(args).output().expect("redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn an_interrupted_seed_leaves_no_marker_and_is_completed_by_the_next() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url(), "t").await.unwrap();
    let histories: Vec<(String, Vec<StoredEvent>)> =
        (0..300).map(|u| (format!("u{u}"), (0..200).map(|i| ev(&format!("item-{u}-{i}-padding-padding"), i)).collect())).collect();

    // Redis runs out of memory part-way through the seed (~3 MB of histories, ~0.5 MB allowed).
    let info = redis_cli(&redis, &["INFO", "memory"]);
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory", &(used + 512 * 1024).to_string()]);
    let err = store.seed_once(histories.clone()).await.unwrap_err();
    assert!(err.to_string().contains("redis"), "{err}");
    assert_eq!(redis_cli(&redis, &["EXISTS", "t:history:u0"]), "1", "the seed wrote part of the data");
    assert_eq!(redis_cli(&redis, &["EXISTS", "t:history:u299"]), "0", "the seed did not finish");
    assert_eq!(redis_cli(&redis, &["EXISTS", "t:seeded"]), "0", "a partial store is not marked seeded");

    // A user appended to by then keeps that history (the seed leaves existing lists alone).
    redis_cli(&redis, &["CONFIG", "SET", "maxmemory", "0"]);
    store.append("u299", &[ev("live", 1)]).await.unwrap();

    // The next start's seed completes the store, without duplicating what was written.
    assert!(store.seed_once(histories.clone()).await.unwrap());
    assert_eq!(redis_cli(&redis, &["EXISTS", "t:seeded"]), "1");
    for (user, events) in &histories[..299] {
        assert_eq!(&store.read(user).await.unwrap(), events, "{user}");
    }
    assert_eq!(store.read("u299").await.unwrap(), vec![ev("live", 1)]);
    assert!(!store.seed_once(histories).await.unwrap(), "seeding happens once");
}

/// Redis with `requirepass`, as compose and Kubernetes run it: the store without the password is
/// refused, with it (given apart from the URL) it works; the gateway binary reads it from
/// `[gateway.store] password_file`, and an empty password file stops its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_password_is_required_and_read_from_a_file() {
    use llamarec_tests::{binary, free_port, wait_serving, Process};
    const PASSWORD: &str = "redis-Secret-7f3a";
    let redis = Redis::start_with_password(PASSWORD);
    let refused = match RedisStore::connect(&redis.url(), "t").await {
        Err(e) => e.to_string(),
        Ok(store) => store.append("u1", &[ev("a", 1)]).await.expect_err("an append without the password was accepted").to_string(),
    };
    assert!(refused.contains("NOAUTH") || refused.contains("uthentication"), "{refused}");
    let store = RedisStore::connect_with_password(&redis.url(), "t", Some(PASSWORD)).await.unwrap();
    assert_eq!(store.append("u1", &[ev("a", 1)]).await.unwrap(), 1);

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("redis-password");
    let config = dir.path().join("gateway.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!(
            "[telemetry]\nlog_level = \"warn\"\n[gateway]\nlisten = \"{listen}\"\nmetrics_listen = \"127.0.0.1:{}\"\nretriever = \"127.0.0.1:{}\"\n[gateway.rankers]\naddresses = []\n[gateway.store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"g\"\npassword_file = \"{}\"\n",
            free_port(),
            free_port(),
            redis.url(),
            password_file.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();

    // An empty Secret (mounted before it was filled) stops the start, naming the key.
    std::fs::write(&password_file, "\n").unwrap();
    let out = std::process::Command::new(binary("gateway")).args(["--config", &config]).current_dir(llamarec_tests::repo_root()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("password_file") && stderr.contains("empty"), "{stderr}");

    // With the password the gateway connects, seeds the store and serves.
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let _gateway = Process::start("gateway", &binary("gateway"), &["--config", &config], &[]);
    wait_serving(&listen, Duration::from_secs(120)).await.unwrap();
    let seeded = RedisStore::connect_with_password(&redis.url(), "g", Some(PASSWORD)).await.unwrap();
    assert!(!seeded.read("42").await.unwrap().is_empty(), "the gateway seeded Redis through the password");
}
