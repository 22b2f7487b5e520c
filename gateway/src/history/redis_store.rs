//! Redis-backed histories, shared by several gateway replicas. Each user is one list of
//! `timestamp_ms item_id` strings; RPUSH appends a whole batch and LTRIM keeps the newest
//! `max_history` in the same MULTI/EXEC, acknowledged once Redis has it (run Redis with
//! `appendonly yes`, `appendfsync always` for disk durability).

use super::{HistoryStore, StoreError, StoredEvent};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

/// [`HistoryStore`] over Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    /// Events kept per user (the newest).
    max_history: usize,
}

/// Seeds one user (KEYS[1], its entries in ARGV) unless the user already has a list.
const SEED_USER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 1, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn encode(e: &StoredEvent) -> String {
    format!("{} {}", e.timestamp_ms, e.item_id)
}

fn decode(s: &str) -> Option<StoredEvent> {
    let (ts, item) = s.split_once(' ')?;
    Some(StoredEvent { item_id: item.to_string(), timestamp_ms: ts.parse().ok()? })
}

impl RedisStore {
    /// Connects to `url`; the connection manager reconnects by itself after Redis restarts.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with_password(url, prefix, None).await
    }

    /// [`connect`](Self::connect), authenticating with `password` (Redis `requirepass`) when
    /// given, so that the password need not be written into the URL.
    pub async fn connect_with_password(url: &str, prefix: &str, password: Option<&str>) -> Result<Self, StoreError> {
        use redis::IntoConnectionInfo;
        let mut info = url.into_connection_info().map_err(unavailable)?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(unavailable)?;
        Ok(Self { conn, prefix: prefix.to_string(), max_history: usize::MAX })
    }

    /// Keeps at most `max_history` events per user (the newest), trimmed in the same
    /// transaction as each append. Unlimited unless set.
    pub fn with_max_history(mut self, max_history: usize) -> Self {
        self.max_history = max_history.max(1);
        self
    }

    /// LTRIM's start index that keeps the newest `max_history` entries.
    fn trim_start(&self) -> isize {
        -(self.max_history.min(isize::MAX as usize) as isize)
    }

    fn key(&self, user: &str) -> String {
        format!("{}:history:{user}", self.prefix)
    }
}

impl HistoryStore for RedisStore {
    async fn append(&self, user: &str, events: &[StoredEvent]) -> Result<u32, StoreError> {
        let values: Vec<String> = events.iter().map(encode).collect();
        let key = self.key(user);
        let mut conn = self.conn.clone();
        // MULTI/EXEC: no reader sees the list longer than the cap, and no crash leaves it so.
        let (len,): (u64,) = redis::pipe()
            .atomic()
            .rpush(&key, values)
            .ltrim(&key, self.trim_start(), -1)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(len.min(self.max_history as u64).min(u32::MAX as u64) as u32)
    }

    async fn read(&self, user: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn.lrange(self.key(user), 0, -1).await.map_err(unavailable)?;
        raw.iter()
            .map(|s| decode(s).ok_or_else(|| StoreError::Unavailable(format!("redis: malformed history entry {s:?} for user {user:?}"))))
            .collect()
    }

    async fn seed_once(&self, histories: Vec<(String, Vec<StoredEvent>)>) -> Result<bool, StoreError> {
        let marker = format!("{}:seeded", self.prefix);
        let mut conn = self.conn.clone();
        if conn.exists::<_, bool>(&marker).await.map_err(unavailable)? {
            return Ok(false);
        }
        // Each user is written whole (one RPUSH in a script) and only when the user has no list
        // yet, so running this again after a crash part-way, or on two replicas starting at
        // once, completes the store without duplicating any history.
        for chunk in histories.chunks(256) {
            let mut pipe = redis::pipe();
            for (user, events) in chunk {
                if !events.is_empty() {
                    let events = &events[events.len().saturating_sub(self.max_history)..];
                    pipe.cmd("EVAL").arg(SEED_USER).arg(1).arg(self.key(user)).arg(events.iter().map(encode).collect::<Vec<_>>()).ignore();
                }
            }
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        // The marker only once every user is written: a store with a marker is complete.
        let first: bool = redis::cmd("SET")
            .arg(&marker)
            .arg(1)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(unavailable)?
            .is_some();
        Ok(first)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_even_with_spaces_in_item_ids() {
        let e = StoredEvent { item_id: "B00 X".into(), timestamp_ms: -5 };
        assert_eq!(decode(&encode(&e)), Some(e));
        assert_eq!(decode("garbage"), None);
    }
}
