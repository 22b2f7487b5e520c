//! User histories: a [`HistoryStore`] (embedded redb or Redis) behind a [`UserHistoryCache`].

mod cache;
mod embedded;
mod redis_store;

pub use cache::{CachedHistory, UserHistoryCache};
pub use embedded::EmbeddedStore;
pub use redis_store::RedisStore;

use serde::{Deserialize, Serialize};
use std::future::Future;

/// One stored interaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// External item id.
    pub item_id: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend is not reachable or failed; nothing was acknowledged.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
}

/// Durable per-user event lists. `append` returns only once the events are durable, so an
/// acknowledged AppendEvents survives a gateway crash.
pub trait HistoryStore: Send + Sync + 'static {
    /// Appends `events` (in order) to the user's history; returns the new length.
    fn append(&self, user: &str, events: &[StoredEvent]) -> impl Future<Output = Result<u32, StoreError>> + Send;
    /// The user's history, oldest first; empty for an unknown user.
    fn read(&self, user: &str) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;
    /// Loads many histories at once, only if the store has never been seeded; returns whether it
    /// seeded. The store is marked seeded only once all of them are written, so a seed
    /// interrupted part-way is completed by the next start.
    fn seed_once(&self, histories: Vec<(String, Vec<StoredEvent>)>) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// A cheap round trip that fails when the backend is down (for readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Either backend, chosen by configuration at start.
pub enum AnyStore {
    /// Embedded redb.
    Embedded(EmbeddedStore),
    /// Redis.
    Redis(RedisStore),
}

impl HistoryStore for AnyStore {
    async fn append(&self, user: &str, events: &[StoredEvent]) -> Result<u32, StoreError> {
        match self {
            AnyStore::Embedded(s) => s.append(user, events).await,
            AnyStore::Redis(s) => s.append(user, events).await,
        }
    }

    async fn read(&self, user: &str) -> Result<Vec<StoredEvent>, StoreError> {
        match self {
            AnyStore::Embedded(s) => s.read(user).await,
            AnyStore::Redis(s) => s.read(user).await,
        }
    }

    async fn seed_once(&self, histories: Vec<(String, Vec<StoredEvent>)>) -> Result<bool, StoreError> {
        match self {
            AnyStore::Embedded(s) => s.seed_once(histories).await,
            AnyStore::Redis(s) => s.seed_once(histories).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Embedded(s) => s.ping().await,
            AnyStore::Redis(s) => s.ping().await,
        }
    }
}
