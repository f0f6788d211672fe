//! Where responses are kept: the [`IdempotencyStore`] trait, with a PostgreSQL implementation on the
//! effect ledger ([`PgStore`]) and an in-memory one for tests and single processes
//! ([`MemoryStore`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oncely_core::ledger::{self, ClaimOptions, Claimed, LedgerKey};
use serde::{Deserialize, Serialize};

/// The ledger namespace of HTTP idempotency keys.
pub const HTTP_NAMESPACE: &str = "http";
/// Defaults to 10,000: entries a [`MemoryStore`] keeps before evicting the oldest.
pub const DEFAULT_MEMORY_CAPACITY: usize = 10_000;

/// A stored response: status, the safe headers, the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The status code.
    pub status: u16,
    /// Headers kept for replay (content-type, location, etag, ...).
    pub headers: Vec<(String, String)>,
    /// The body, base64 in storage.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// What a claim decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreClaim {
    /// Run the request; complete or release with this token.
    Run {
        /// The claim's fencing token.
        token: i32,
    },
    /// The request ran before: replay this.
    Replay(StoredResponse),
    /// A request with this key is still running.
    Busy {
        /// Time left on its lease.
        retry_after: Duration,
    },
    /// The key was used with a different request.
    Mismatch,
}

/// A store failure (the database is away, ...). Its text is logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
#[error("idempotency store: {0}")]
pub struct StoreError(pub String);

impl From<oncely_core::Error> for StoreError {
    fn from(e: oncely_core::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A place to keep responses by (scope, key).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claim `key` in `scope` for a request with `fingerprint`: run it, replay, busy or mismatch.
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<StoreClaim, StoreError>;
    /// Store the response of claim `token`, kept for `ttl`.
    async fn complete(
        &self,
        scope: &str,
        key: &str,
        token: i32,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Forget claim `token` so the next request with the key runs.
    async fn release(&self, scope: &str, key: &str, token: i32) -> Result<(), StoreError>;
    /// Extend claim `token`'s lease to `lease` from now while its request still runs. The layer
    /// calls it every third of the lease; the default does nothing (the lease then bounds how long
    /// a handler may run before a duplicate may run beside it).
    async fn extend(&self, scope: &str, key: &str, token: i32, lease: Duration) -> Result<(), StoreError> {
        let _ = (scope, key, token, lease);
        Ok(())
    }
}

/// The ledger key of (scope, key). The scope's length leads, so that no two pairs share a key
/// whatever `|` they contain (`a|b` + `c` and `a` + `b|c` differ).
pub(crate) fn ledger_key(scope: &str, key: &str) -> LedgerKey {
    LedgerKey::new(HTTP_NAMESPACE, format!("{}:{scope}|{key}", scope.len()))
}

/// The store on the effect ledger (`oncely.ledger`, namespace `http`). Expired keys are deleted by
/// the worker's maintenance (or `oncely purge`), with an audit record per run.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: sqlx::PgPool,
}

/// Defaults to 1 hour: how often [`PgStore::spawn_cleanup`] deletes expired keys.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Expired ledger records deleted per statement by [`PgStore::spawn_cleanup`].
const CLEANUP_BATCH: i64 = 5_000;

impl PgStore {
    /// A store on `pool` (migrated with `oncely_core::migrate`).
    pub fn new(pool: sqlx::PgPool) -> Self {
        PgStore { pool }
    }

    /// For services that run no oncely worker (whose maintenance leader does this already): delete
    /// expired keys every `interval` ([`DEFAULT_CLEANUP_INTERVAL`]), in batches, writing one audit
    /// row per run to `oncely.maintenance_runs` (task `ledger_cleanup`). The schedule is kept
    /// there: the first run comes at once if the last recorded one is `interval` old or more.
    /// Several replicas may each run it: deletes are idempotent, and each run is audited. Abort
    /// the handle to stop it.
    ///
    /// ```no_run
    /// # async fn example(pool: sqlx::PgPool) {
    /// let store = oncely_http::PgStore::new(pool);
    /// let cleanup = store.spawn_cleanup(oncely_http::store::DEFAULT_CLEANUP_INTERVAL);
    /// # cleanup.abort(); }
    /// ```
    pub fn spawn_cleanup(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                // Scheduled from the last audited run, not from this process's start (replicas
                // restarted more often than `interval` still clean up), and run under a per-task
                // lock (replicas never clean up at the same moment).
                let cleanup = || async {
                    let n = ledger::delete_all_expired(&pool, CLEANUP_BATCH).await?;
                    tracing::info!(deleted = n, "deleted expired idempotency keys");
                    Ok(n)
                };
                let task = oncely_core::maintenance::LEDGER_CLEANUP_TASK;
                let wait =
                    match oncely_core::maintenance::run_if_due(&pool, task, interval, Some("oncely-http"), cleanup)
                        .await
                    {
                        Ok(wait) => wait,
                        Err(e) => {
                            tracing::warn!(error = %e, "idempotency key cleanup failed; next try in one interval");
                            interval
                        }
                    };
                // Never a busy loop, even with a zero interval.
                tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
            }
        })
    }
}

pub(crate) fn decode(c: Claimed) -> Result<StoreClaim, StoreError> {
    Ok(match c {
        Claimed::Run { attempt, .. } => StoreClaim::Run { token: attempt },
        Claimed::Completed(v) => StoreClaim::Replay(serde_json::from_value(v).map_err(|e| StoreError(e.to_string()))?),
        Claimed::Busy { retry_after } => StoreClaim::Busy { retry_after },
        Claimed::Mismatch => StoreClaim::Mismatch,
    })
}

pub(crate) fn claim_options<'a>(
    owner: &'a str,
    fingerprint: &'a str,
    lease: Duration,
    ttl: Duration,
) -> ClaimOptions<'a> {
    ClaimOptions {
        owner,
        fingerprint: Some(fingerprint),
        lease,
        ttl: Some(ttl),
        supersedes: None,
        now: None,
        read_first: true,
    }
}

#[async_trait]
impl IdempotencyStore for PgStore {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<StoreClaim, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(|e| StoreError(e.to_string()))?;
        let owner = format!("http:{}", uuid::Uuid::new_v4());
        decode(
            ledger::claim(&mut conn, &ledger_key(scope, key), &claim_options(&owner, fingerprint, lease, ttl)).await?,
        )
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        token: i32,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_value(response).map_err(|e| StoreError(e.to_string()))?;
        Ok(ledger::complete(&self.pool, &ledger_key(scope, key), token, &json, Some(ttl)).await?)
    }

    async fn release(&self, scope: &str, key: &str, token: i32) -> Result<(), StoreError> {
        Ok(ledger::release(&self.pool, &ledger_key(scope, key), token).await?)
    }

    async fn extend(&self, scope: &str, key: &str, token: i32, lease: Duration) -> Result<(), StoreError> {
        Ok(ledger::extend(&self.pool, &ledger_key(scope, key), token, lease).await?)
    }
}

struct Entry {
    fingerprint: String,
    token: i32,
    /// Insertion sequence number, for eviction by age.
    seq: u64,
    expires: Instant,
    /// `None` while in progress.
    response: Option<StoredResponse>,
    lease_until: Instant,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(String, String), Entry>,
    /// Keys by insertion, oldest first (with their sequence number; stale pairs are skipped).
    order: VecDeque<(u64, (String, String))>,
    next_seq: u64,
}

/// An in-memory store: for tests and single-process services. Capped at a number of entries, it
/// evicts the oldest when full (an evicted key runs again if repeated). Lost on restart.
pub struct MemoryStore {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MEMORY_CAPACITY)
    }
}

impl MemoryStore {
    /// A store keeping at most `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryStore { entries: Mutex::new(Entries::default()), capacity: capacity.max(1) }
    }

    /// Entries held now (expired ones included until they are looked up or evicted).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("memory store lock poisoned").map.len()
    }

    /// Length of the eviction queue (for tests: it stays proportional to the capacity).
    #[doc(hidden)]
    pub fn queue_len(&self) -> usize {
        self.entries.lock().expect("memory store lock poisoned").order.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Entries {
    /// Drop the oldest entries until there is room for one more. A key whose request is still
    /// running (a live lease) is never dropped — that would let a duplicate run beside it — so with
    /// every entry in progress the store grows past its capacity until they finish.
    fn make_room(&mut self, capacity: usize, now: Instant) {
        let mut running = Vec::new();
        while self.map.len() >= capacity {
            let Some((seq, id)) = self.order.pop_front() else { break };
            match self.map.get(&id) {
                Some(e) if e.seq == seq && e.response.is_none() && e.lease_until > now => running.push((seq, id)),
                Some(e) if e.seq == seq => {
                    self.map.remove(&id);
                }
                _ => {} // stale: the entry was released, expired or replaced
            }
        }
        // Running entries keep their place at the front, oldest first.
        for item in running.into_iter().rev() {
            self.order.push_front(item);
        }
        // Released and expired entries leave stale pairs behind; keep the queue proportional to
        // the map.
        if self.order.len() > 2 * capacity.max(self.map.len()) {
            let map = &self.map;
            self.order.retain(|(seq, id)| map.get(id).is_some_and(|e| e.seq == *seq));
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<StoreClaim, StoreError> {
        let now = Instant::now();
        let mut guard = self.entries.lock().expect("memory store lock poisoned");
        let entries = &mut *guard;
        let id = (scope.to_owned(), key.to_owned());
        if entries.map.get(&id).is_some_and(|e| e.expires <= now) {
            entries.map.remove(&id);
        }
        if let Some(e) = entries.map.get_mut(&id) {
            if e.fingerprint != fingerprint {
                return Ok(StoreClaim::Mismatch);
            }
            if let Some(r) = &e.response {
                return Ok(StoreClaim::Replay(r.clone()));
            }
            if e.lease_until > now {
                return Ok(StoreClaim::Busy { retry_after: e.lease_until - now });
            }
            e.token += 1;
            e.lease_until = now + lease;
            return Ok(StoreClaim::Run { token: e.token });
        }
        entries.make_room(self.capacity, now);
        let seq = entries.next_seq;
        entries.next_seq += 1;
        entries.order.push_back((seq, id.clone()));
        entries.map.insert(
            id,
            Entry {
                fingerprint: fingerprint.to_owned(),
                token: 1,
                seq,
                expires: now + ttl,
                response: None,
                lease_until: now + lease,
            },
        );
        Ok(StoreClaim::Run { token: 1 })
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        token: i32,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().expect("memory store lock poisoned");
        match entries.map.get_mut(&(scope.to_owned(), key.to_owned())) {
            Some(e) if e.token == token && e.response.is_none() => {
                e.response = Some(response.clone());
                e.expires = Instant::now() + ttl;
                Ok(())
            }
            _ => Err(StoreError(format!("claim {token} of key {key} was taken over"))),
        }
    }

    async fn release(&self, scope: &str, key: &str, token: i32) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().expect("memory store lock poisoned");
        let id = (scope.to_owned(), key.to_owned());
        if entries.map.get(&id).is_some_and(|e| e.token == token && e.response.is_none()) {
            entries.map.remove(&id);
        }
        Ok(())
    }

    async fn extend(&self, scope: &str, key: &str, token: i32, lease: Duration) -> Result<(), StoreError> {
        let mut entries = self.entries.lock().expect("memory store lock poisoned");
        match entries.map.get_mut(&(scope.to_owned(), key.to_owned())) {
            Some(e) if e.token == token && e.response.is_none() => {
                e.lease_until = Instant::now() + lease;
                Ok(())
            }
            _ => Err(StoreError(format!("claim {token} of key {key} was taken over"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(body: &str) -> StoredResponse {
        StoredResponse { status: 201, headers: vec![], body: body.as_bytes().to_vec() }
    }

    #[test]
    fn ledger_keys_of_different_scope_and_key_pairs_differ() {
        assert_ne!(ledger_key("a|b", "c").key, ledger_key("a", "b|c").key);
        assert_eq!(ledger_key("tenant", "k1").key, ledger_key("tenant", "k1").key);
    }

    #[tokio::test]
    async fn memory_store_evicts_the_oldest_when_full_and_expires_by_ttl() {
        let store = MemoryStore::with_capacity(2);
        let (lease, ttl) = (Duration::from_secs(60), Duration::from_secs(60));
        for k in ["a", "b", "c"] {
            let StoreClaim::Run { token } = store.claim("s", k, "fp", lease, ttl).await.unwrap() else {
                panic!("new key runs")
            };
            store.complete("s", k, token, &resp(k), ttl).await.unwrap();
        }
        assert_eq!(store.len(), 2);
        assert!(
            matches!(store.claim("s", "a", "fp", lease, ttl).await.unwrap(), StoreClaim::Run { .. }),
            "the oldest was evicted"
        );
        assert_eq!(store.claim("s", "c", "fp", lease, ttl).await.unwrap(), StoreClaim::Replay(resp("c")));
        assert_eq!(store.claim("s", "c", "other", lease, ttl).await.unwrap(), StoreClaim::Mismatch);

        let short = MemoryStore::default();
        let StoreClaim::Run { token } = short.claim("s", "k", "fp", lease, Duration::ZERO).await.unwrap() else {
            panic!()
        };
        short.complete("s", "k", token, &resp("k"), Duration::ZERO).await.unwrap();
        assert!(
            matches!(short.claim("s", "k", "fp", lease, ttl).await.unwrap(), StoreClaim::Run { .. }),
            "expired: runs again"
        );
    }

    #[tokio::test]
    async fn memory_store_never_evicts_a_running_key_and_its_queue_stays_bounded() {
        let store = MemoryStore::with_capacity(2);
        let (lease, ttl) = (Duration::from_secs(60), Duration::from_secs(60));
        // Two requests in progress fill the store; a third key still runs, and neither running
        // key is evicted: their duplicates are busy, not run again.
        for k in ["a", "b", "c"] {
            assert!(matches!(store.claim("s", k, "fp", lease, ttl).await.unwrap(), StoreClaim::Run { .. }));
        }
        assert_eq!(store.len(), 3, "over capacity while all are running");
        for k in ["a", "b"] {
            assert!(matches!(store.claim("s", k, "fp", lease, ttl).await.unwrap(), StoreClaim::Busy { .. }), "{k}");
        }
        // Many released keys (5xx) leave no trail in the eviction queue.
        for i in 0..1000 {
            let k = format!("r{i}");
            let StoreClaim::Run { token } = store.claim("s", &k, "fp", lease, ttl).await.unwrap() else { panic!() };
            store.release("s", &k, token).await.unwrap();
        }
        assert!(store.queue_len() <= 2 * store.len().max(2) + 1, "queue {}", store.queue_len());
    }

    #[tokio::test]
    async fn memory_store_is_busy_within_the_lease_and_fences_the_old_claim_after_it() {
        let store = MemoryStore::default();
        let ttl = Duration::from_secs(60);
        let StoreClaim::Run { token: t1 } = store.claim("s", "k", "fp", Duration::ZERO, ttl).await.unwrap() else {
            panic!()
        };
        let StoreClaim::Run { token: t2 } = store.claim("s", "k", "fp", Duration::from_secs(60), ttl).await.unwrap()
        else {
            panic!("lease over: taken over")
        };
        assert!(t2 > t1);
        assert!(matches!(
            store.claim("s", "k", "fp", Duration::from_secs(60), ttl).await.unwrap(),
            StoreClaim::Busy { .. }
        ));
        assert!(store.complete("s", "k", t1, &resp("late"), ttl).await.is_err(), "the old claim is fenced out");
        store.complete("s", "k", t2, &resp("ok"), ttl).await.unwrap();
    }
}
