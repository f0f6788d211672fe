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
//! # Records on a job's first attempt
//!
//! On a job's first attempt no record of its own steps can exist yet, and its lease keeps other
//! attempts away, so the worker saves the claim ([`StepScope::with_deferred_records`]): a memoized
//! step under its job-scoped key runs at once and its record is written with the attempt's
//! outcome (in the completion batch's statement, or before a retry, snooze or suspension is
//! written); a transactional step inserts its record (with those waiting) at the end of its own
//! transaction, and the record's primary key still decides against a concurrent later attempt.
//! The guarantees above are unchanged — a crash before the record is written runs a memoized
//! step again, as a crash between a step and its record always could. Business keys, external
//! steps and later attempts claim first.
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

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use sqlx::PgPool;
use tracing::Instrument;

pub use crate::boundary::{Boundary, BoundaryHook, BoundaryPoint, InjectedCrash};
use crate::effect::Effect;
pub use crate::effect::{BoxError, OnUnknown, Reconciler, StepError, DEFAULT_CALLEE_KEY_WINDOW};
use crate::job::JobId;
use crate::ledger::{DeferredRecord, LedgerKey};

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
    deferred: Option<DeferredRecords>,
}

impl std::fmt::Debug for StepScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepScope").field("job_id", &self.job_id).field("attempt", &self.attempt).finish()
    }
}

impl StepScope {
    /// The scope of attempt `attempt` of job `job_id`.
    pub fn new(pool: PgPool, job_id: JobId, attempt: i32) -> Self {
        StepScope { pool, job_id, attempt, used: Mutex::new(HashSet::new()), hook: None, guard: None, deferred: None }
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

    /// Defer the records of this attempt's steps where that is safe, into `records`, which the
    /// caller then must write ([`DeferredRecords::flush`], or with the job's completion through
    /// [`crate::lease::complete_jobs_recording`]) before the job's outcome — the worker does.
    ///
    /// Only on a job's first attempt (`attempt == 1`) and only for steps under their default,
    /// job-scoped key: no record of them can exist yet, so a memoized step runs without a claim
    /// and its record rides with the attempt's outcome, and a transactional step writes its
    /// record (and the deferred ones) with one `INSERT` in its transaction instead of a claim and
    /// an update. The documented guarantee is unchanged: a crash between a memoized step's work
    /// and its record runs the work again on the next attempt. Later attempts, business keys
    /// ([`Step::key`]) and external steps always claim first.
    pub fn with_deferred_records(mut self, records: Option<DeferredRecords>) -> Self {
        self.deferred = records;
        self
    }

    /// The deferred records of this attempt, when the attempt may defer them.
    fn deferring(&self) -> Option<&DeferredRecords> {
        self.deferred.as_ref().filter(|_| self.attempt == 1)
    }

    /// Write this attempt's deferred records now (before the attempt suspends or completes in a
    /// transaction of its own), on `executor`. Nothing to write: no round trip.
    pub async fn flush_deferred<'e>(&self, executor: impl sqlx::PgExecutor<'e>) -> Result<(), crate::Error> {
        match &self.deferred {
            Some(records) => records.flush(executor).await,
            None => Ok(()),
        }
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

    /// Where this step's record waits, when it may be deferred: on a job's first attempt, under the
    /// step's own job-scoped key (see [`StepScope::with_deferred_records`]).
    fn deferred(&self) -> Option<&'a DeferredRecords> {
        self.scope.deferring().filter(|_| self.key.is_none())
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
            let deferred = self.deferred();
            let (mut effect, name) = self.effect()?;
            scope.check(&name).await?;
            effect.label = &name;
            match deferred {
                Some(records) => effect.run_deferred(records, f).await,
                None => effect.run(OnUnknown::RetrySameKeyWithin(Duration::MAX), |_| f()).await,
            }
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
            let deferred = self.deferred();
            let (mut effect, name) = self.effect()?;
            scope.check(&name).await?;
            effect.label = &name;
            match deferred {
                Some(records) => effect.transactional_unclaimed(records, f).await,
                None => effect.transactional(f).await,
            }
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

/// The step records an attempt deferred ([`StepScope::with_deferred_records`]): shared between
/// the attempt's steps and the worker that writes them with the attempt's outcome.
#[derive(Debug, Clone, Default)]
pub struct DeferredRecords {
    records: std::sync::Arc<Mutex<Vec<DeferredRecord>>>,
    clock: Option<(DateTime<Utc>, std::time::Instant)>,
}

/// Deferred records beyond this many are written at once, so an attempt with many steps does not
/// build an unbounded statement.
pub const MAX_DEFERRED_RECORDS: usize = 100;

impl DeferredRecords {
    /// Records whose times ([`DeferredRecord::at`]) follow the database clock: `at` is a database
    /// time read at the local instant `since` or just before it (the job's `attempted_at`, which
    /// the claim takes from `clock_timestamp()`, and the instant its answer arrived), and a step's
    /// time is `at` plus the time elapsed since `since`. Without a database time the local clock
    /// is used. Step times order a run's history and decide which steps a re-run from a step
    /// invalidates, so they must not be skewed against the steps the ledger times itself (with the
    /// database's `now()`).
    pub fn with_clock(at: Option<DateTime<Utc>>, since: std::time::Instant) -> Self {
        DeferredRecords { records: Default::default(), clock: at.map(|at| (at, since)) }
    }

    /// Now, on the clock of [`with_clock`](Self::with_clock).
    pub fn now(&self) -> DateTime<Utc> {
        match self.clock {
            Some((at, since)) => at + chrono::Duration::from_std(since.elapsed()).unwrap_or_default(),
            None => Utc::now(),
        }
    }

    /// Add a record.
    pub fn push(&self, record: DeferredRecord) {
        self.lock().push(record);
    }

    /// Take the records out (the caller writes them).
    pub fn take(&self) -> Vec<DeferredRecord> {
        std::mem::take(&mut *self.lock())
    }

    /// Put records taken out back in front (their write was rolled back).
    pub fn restore(&self, mut records: Vec<DeferredRecord>) {
        let mut held = self.lock();
        records.append(&mut held);
        *held = records;
    }

    /// How many records wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no record waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write the waiting records on `executor` (one statement; none when nothing waits). On error
    /// they are put back.
    pub async fn flush<'e>(&self, executor: impl sqlx::PgExecutor<'e>) -> Result<(), crate::Error> {
        let records = self.take();
        if records.is_empty() {
            return Ok(());
        }
        match crate::ledger::record_many(executor, &records).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.restore(records);
                Err(e)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DeferredRecord>> {
        self.records.lock().expect("deferred-records lock poisoned by a panic while held")
    }
}
