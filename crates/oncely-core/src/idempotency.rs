//! The idempotency API: run something once per key outside a job ([`with_idempotency`],
//! [`with_idempotency_transactional`], and [`idempotent`] with options). A front-end over the
//! effect engine ([`crate::effect`]), in the ledger namespace [`IDEMPOTENCY_NAMESPACE`].

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use sqlx::PgPool;

use crate::effect::{BoxError, Effect, OnUnknown, StepError};
use crate::ledger::LedgerKey;

/// Defaults to `idempotency`: the ledger namespace of [`with_idempotency`].
pub const IDEMPOTENCY_NAMESPACE: &str = "idempotency";
/// Defaults to 60 s: how long a [`with_idempotency`] claim holds before another caller may take it
/// over (its holder is presumed dead).
pub const DEFAULT_IDEMPOTENCY_LEASE: Duration = Duration::from_secs(60);

fn idempotency_effect<'a>(pool: &'a PgPool, key: &'a str, ttl: Duration) -> Effect<'a> {
    idempotent(pool, key).ttl(ttl).into_effect()
}

/// Defaults to 24 hours: how long an [`idempotent`] call's record lasts unless told otherwise.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Run something once per key, with options: [`with_idempotency`] and [`with_idempotency_transactional`]
/// with a fingerprint, a record kept forever, or concurrent duplicates that wait for the first
/// call's result instead of getting [`StepError::Busy`].
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool, body: String) -> Result<(), oncely_core::StepError> {
/// use std::time::Duration;
/// let session: String = oncely_core::idempotent(&pool, "checkout:user-7:req-123")
///     .fingerprint(&body) // the same key with another request is refused (StepError::Mismatch)
///     .wait(Duration::from_secs(10)) // a double-click waits for the first call's answer
///     .run(|| async { Ok::<_, std::io::Error>("cs_test_123".to_string()) })
///     .await?;
/// # Ok(()) }
/// ```
pub fn idempotent<'a>(pool: &'a PgPool, key: &'a str) -> Idempotent<'a> {
    Idempotent {
        pool,
        key,
        ttl: Some(DEFAULT_IDEMPOTENCY_TTL),
        fingerprint: None,
        wait: Duration::ZERO,
        lease: DEFAULT_IDEMPOTENCY_LEASE,
    }
}

/// Options of a once-per-key call; see [`idempotent`].
#[must_use = "an idempotent call does nothing until .run(..) or .transactional(..) is awaited"]
#[derive(Debug, Clone)]
pub struct Idempotent<'a> {
    pool: &'a PgPool,
    key: &'a str,
    ttl: Option<Duration>,
    fingerprint: Option<String>,
    wait: Duration,
    lease: Duration,
}

impl Idempotent<'_> {
    /// How long the record lasts ([`DEFAULT_IDEMPOTENCY_TTL`] by default); after it the key is free.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Keep the record forever: the key is never free again.
    pub fn keep_forever(mut self) -> Self {
        self.ttl = None;
        self
    }

    /// What the call is (e.g. a hash of the request): a later call under the same key with another
    /// fingerprint gets [`StepError::Mismatch`] instead of the first call's result. Compared as is;
    /// pass something short (a hash) for large inputs.
    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = Some(fingerprint.into());
        self
    }

    /// Let a call that finds the key held by a running call wait up to `wait` for that call's
    /// result (returned as its own) instead of failing at once with [`StepError::Busy`]; past
    /// `wait` it is still `Busy`. In [`transactional`](Self::transactional) a duplicate waits on the first
    /// call's transaction anyway.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// How long a running call holds the key before another may take it over if it stops
    /// renewing it (it renews while it runs). [`DEFAULT_IDEMPOTENCY_LEASE`] by default.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Run `f` once per key, outside any transaction: see [`with_idempotency`].
    pub async fn run<T, E, F, Fut>(self, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let effect = self.into_effect();
        // `f` is handed no key, so no callee window applies: a call that left no result runs again.
        effect.run(OnUnknown::RetrySameKeyWithin(Duration::MAX), |_| f()).await
    }

    /// Run `f` once per key in the transaction that records it: see [`with_idempotency_transactional`].
    pub async fn transactional<T, E, F>(self, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<T, E>>,
        E: Into<BoxError>,
    {
        let effect = self.into_effect();
        effect.transactional(f).await
    }
}

impl<'a> Idempotent<'a> {
    fn into_effect(self) -> Effect<'a> {
        Effect {
            pool: self.pool,
            label: self.key,
            key: LedgerKey::new(IDEMPOTENCY_NAMESPACE, self.key),
            owner: format!("call:{}", uuid::Uuid::new_v4()),
            supersedes: None,
            lease: self.lease,
            ttl: self.ttl,
            hook: None,
            fingerprint: self.fingerprint,
            wait: self.wait,
        }
    }
}

/// Run `f` once per `key` for `ttl`: the first call runs it and stores its result; later calls
/// return the stored result without running `f`; after `ttl` the key is free again. Concurrent
/// calls with one key run `f` once: the others get [`StepError::Busy`] while it runs.
///
/// `f` runs outside any transaction, so a crash between `f` and the record runs `f` again on the
/// next call (after the 60 s claim lease): effectively once if what `f` calls deduplicates on a
/// key. For database effects use [`with_idempotency_transactional`], which is exactly once.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), oncely_core::StepError> {
/// use std::time::Duration;
/// let session_id: String = oncely_core::with_idempotency(&pool, "checkout:user-7:req-123", Duration::from_secs(24 * 3600), || async {
///     Ok::<_, std::io::Error>("cs_test_123".to_string()) // call the payment provider here
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn with_idempotency<T, E, F, Fut>(pool: &PgPool, key: &str, ttl: Duration, f: F) -> Result<T, StepError>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    // `f` is handed no key, so no callee window applies: a call that left no result runs again.
    idempotency_effect(pool, key, ttl).run(OnUnknown::RetrySameKeyWithin(Duration::MAX), |_| f()).await
}

/// [`with_idempotency`] for database effects: `f` gets the transaction that also writes the
/// record, so the effect and the record commit together — exactly once.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), oncely_core::StepError> {
/// use std::time::Duration;
/// let total: i64 = oncely_core::with_idempotency_transactional(&pool, "usage:report:42", Duration::from_secs(86_400), |tx| {
///     Box::pin(async move {
///         sqlx::query_scalar("UPDATE usage SET tokens = tokens + 1200 WHERE user_id = 7 RETURNING tokens")
///             .fetch_one(&mut *tx)
///             .await
///     })
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn with_idempotency_transactional<T, E, F>(
    pool: &PgPool,
    key: &str,
    ttl: Duration,
    f: F,
) -> Result<T, StepError>
where
    T: Serialize + DeserializeOwned,
    F: for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<T, E>>,
    E: Into<BoxError>,
{
    idempotency_effect(pool, key, ttl).transactional(f).await
}
