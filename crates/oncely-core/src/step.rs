//! Steps: the parts of a job that must happen once, memoized in the effect ledger.
//!
//! A handler gets a [`StepScope`] for its attempt (the worker's `JobContext::step` calls it). Each
//! step has a key — `job:{job_id}:{name}` by default, or a business key such as
//! `usage:report:{report_id}` that deduplicates across jobs — and one of three forms:
//!
//! - [`Step::run`]: memoize a result. Runs `f` outside a transaction and stores its output; a retry
//!   returns the stored output. A crash between `f` and the record runs `f` again.
//! - [`Step::transactional`]: `f` gets the transaction that also writes the record, so a database
//!   effect and its record commit together: **exactly once**, under crashes and concurrent
//!   duplicates alike.
//! - [`Step::external`]: for calls to other systems. The intent is recorded (committed) before the
//!   call and `f` gets a stable idempotency key derived from the step key — identical on every
//!   retry. If an attempt dies between the call and the record, the outcome is unknown and the
//!   step's [`OnUnknown`] policy decides: call again with the same key, reconcile, or park.
//!   Effectively once when the callee deduplicates on the key; never more than that is possible.
//!
//! Code outside steps runs again on every attempt.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(scope: &oncely_core::step::StepScope, report_id: i64, user_id: i64) -> Result<(), oncely_core::StepError> {
//! // Memoized: the simulated model call is not repeated on a retry.
//! let tokens: i64 = scope.step("generate").run(|| async { Ok::<_, std::io::Error>(1234) }).await?;
//! // Exactly once per report, even across duplicate jobs for the same report.
//! scope
//!     .step("count_usage")
//!     .key(format!("usage:report:{report_id}"))
//!     .transactional(|tx| Box::pin(async move {
//!         sqlx::query("UPDATE usage SET tokens = tokens + $1 WHERE user_id = $2")
//!             .bind(tokens)
//!             .bind(user_id)
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok::<_, sqlx::Error>(tokens)
//!     }))
//!     .await?;
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use sqlx::PgPool;
use tracing::Instrument;

pub use crate::boundary::{Boundary, BoundaryHook, BoundaryPoint, InjectedCrash};
use crate::effect::Effect;
pub use crate::effect::{BoxError, OnUnknown, Reconciler, StepError, DEFAULT_CALLEE_KEY_WINDOW};
use crate::job::JobId;
use crate::ledger::LedgerKey;

/// The ledger namespace of job steps.
pub const STEP_NAMESPACE: &str = "step";
/// Defaults to 30 days: how long a step's record (and so its deduplication) lasts.
pub const DEFAULT_STEP_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Defaults to 5 minutes: how long an in-progress `run` or `external` step holds its key against
/// *other jobs* after its holder stops renewing it (a later attempt of the same job takes it over at
/// once). A running step renews it every third of the lease, so it bounds how long a crashed
/// holder blocks the key, not how long a step may run.
pub const DEFAULT_STEP_LEASE: Duration = Duration::from_secs(300);

/// A check run before every step of a scope (the worker's cancel-on-event check): an error stops
/// the step before it claims its key, as [`StepError::Failed`] with that error as its source.
pub type StepGuard = std::sync::Arc<dyn Fn() -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// The steps of one job attempt.
pub struct StepScope {
    pool: PgPool,
    job_id: JobId,
    attempt: i32,
    used: Mutex<HashSet<String>>,
    hook: Option<BoundaryHook>,
    guard: Option<StepGuard>,
}

impl std::fmt::Debug for StepScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepScope").field("job_id", &self.job_id).field("attempt", &self.attempt).finish()
    }
}

impl StepScope {
    /// The scope of attempt `attempt` of job `job_id`.
    pub fn new(pool: PgPool, job_id: JobId, attempt: i32) -> Self {
        StepScope { pool, job_id, attempt, used: Mutex::new(HashSet::new()), hook: None, guard: None }
    }

    /// Run `guard` before every step (see [`StepGuard`]).
    pub fn with_guard(mut self, guard: Option<StepGuard>) -> Self {
        self.guard = guard;
        self
    }

    /// Run the guard, if any: `Err` stops the step named `name`.
    async fn check(&self, name: &str) -> Result<(), StepError> {
        match &self.guard {
            Some(guard) => guard().await.map_err(|source| StepError::Failed { step: name.to_owned(), source }),
            None => Ok(()),
        }
    }

    /// Call `hook` at every step boundary (for crash testing).
    pub fn with_hook(mut self, hook: Option<BoundaryHook>) -> Self {
        self.hook = hook;
        self
    }

    /// A step named `name` (unique within the job unless given an explicit [`key`](Step::key)).
    pub fn step(&self, name: impl Into<String>) -> Step<'_> {
        Step { scope: self, name: name.into(), key: None, ttl: Some(DEFAULT_STEP_TTL), lease: DEFAULT_STEP_LEASE }
    }
}

/// A step being configured; run it with [`run`](Step::run), [`transactional`](Step::transactional)
/// or [`external`](Step::external).
#[must_use = "a step does nothing until it is run"]
pub struct Step<'a> {
    scope: &'a StepScope,
    name: String,
    key: Option<String>,
    ttl: Option<Duration>,
    lease: Duration,
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<'a> Step<'a> {
    /// Use a business key instead of `job:{job_id}:{name}`: every job using the key shares one
    /// record, so the effect happens once across them (two jobs for one report count once).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// How long the record lasts. Defaults to [`DEFAULT_STEP_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Keep the record forever.
    pub fn keep_forever(mut self) -> Self {
        self.ttl = None;
        self
    }

    /// How long an in-progress claim holds against other jobs once its holder stops renewing it
    /// (the step renews it every third of it while running). Defaults to [`DEFAULT_STEP_LEASE`].
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The step's ledger key.
    pub fn ledger_key(&self) -> LedgerKey {
        let key = match &self.key {
            Some(k) => k.clone(),
            None => format!("job:{}:{}", self.scope.job_id, self.name),
        };
        LedgerKey::new(STEP_NAMESPACE, key)
    }

    /// The stable idempotency key [`external`](Self::external) hands its closure.
    pub fn idempotency_key(&self) -> String {
        self.ledger_key().idempotency_key()
    }

    fn effect(self) -> Result<(Effect<'a>, String), StepError> {
        let key = self.ledger_key();
        let fresh =
            self.scope.used.lock().expect("step-key lock poisoned by a panic while held").insert(key.key.clone());
        if !fresh {
            return Err(StepError::DuplicateKey(key.key));
        }
        let scope = self.scope;
        let effect = Effect {
            pool: &scope.pool,
            label: "",
            key,
            owner: format!("job:{}:{}", scope.job_id, scope.attempt),
            supersedes: Some(format!("job:{}:", scope.job_id)),
            lease: self.lease,
            ttl: self.ttl,
            hook: scope.hook.as_ref().map(|h| (h, scope.job_id)),
            fingerprint: None,
            wait: Duration::ZERO,
        };
        Ok((effect, self.name))
    }

    /// Memoize `f`'s result: on a retry the stored output is returned and `f` does not run. When an
    /// earlier attempt ran `f` and died before recording its output, `f` simply runs again,
    /// however long ago that was: `f` is handed no idempotency key, so there is no callee that
    /// could have forgotten one (that window is [`external`](Self::external)'s concern).
    pub async fn run<T, E, F, Fut>(self, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let span = self.span();
        async move {
            let scope = self.scope;
            let (mut effect, name) = self.effect()?;
            scope.check(&name).await?;
            effect.label = &name;
            effect.run(OnUnknown::RetrySameKeyWithin(Duration::MAX), |_| f()).await
        }
        .instrument(span)
        .await
    }

    /// Run `f` in the transaction that records the step: the effect and the record commit
    /// together, so the effect happens exactly once.
    pub async fn transactional<T, E, F>(self, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<T, E>>,
        E: Into<BoxError>,
    {
        let span = self.span();
        async move {
            let scope = self.scope;
            let (mut effect, name) = self.effect()?;
            scope.check(&name).await?;
            effect.label = &name;
            effect.transactional(f).await
        }
        .instrument(span)
        .await
    }

    /// Call an external system: the intent is recorded first, `f` gets the stable idempotency key
    /// to pass on (e.g. as Stripe's `Idempotency-Key`), and the result is recorded after. When an
    /// earlier attempt died mid-call, `on_unknown` decides. An error from `f` means the call did
    /// not take effect, or may safely be made again with the same key.
    pub async fn external<T, E, F, Fut>(self, on_unknown: OnUnknown<T>, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let span = self.span();
        async move {
            let scope = self.scope;
            let (mut effect, name) = self.effect()?;
            scope.check(&name).await?;
            effect.label = &name;
            effect.run(on_unknown, f).await
        }
        .instrument(span)
        .await
    }

    /// The step's span (`step`, with its name), a child of the job's: a trace of the job shows
    /// each step, replayed or run, and what its closure calls.
    fn span(&self) -> tracing::Span {
        tracing::info_span!("step", step = %self.name)
    }
}
