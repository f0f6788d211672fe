//! The effect engine: claim a ledger key, run the effect once, record its output. Job steps
//! ([`crate::step`]) and the idempotency API ([`crate::idempotency`]) are thin front-ends over it;
//! the crash hooks that test it live in [`crate::boundary`].

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use sqlx::PgPool;

use crate::boundary::{Boundary, BoundaryHook, BoundaryPoint};
use crate::job::JobId;
use crate::ledger::{self, ClaimOptions, Claimed, LedgerKey};

/// The counter of step outcomes (see `Effect::outcome`), labelled by ledger namespace and outcome.
pub(crate) const STEP_OUTCOMES: &str = "oncely_step_outcomes_total";

/// A boxed error from user code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an effect did not produce its output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// The closure returned an error. Nothing was recorded; the next attempt runs it again.
    #[error("step `{step}` failed: {source}")]
    Failed {
        /// The step (or key) name.
        step: String,
        /// The closure's error.
        #[source]
        source: BoxError,
    },
    /// Another claimant holds the key with a live lease (e.g. a duplicate job mid-step).
    #[error("step `{step}`: key {key} is held by another claimant; retry in {retry_after:?}")]
    Busy {
        /// The step name.
        step: String,
        /// The ledger key.
        key: String,
        /// Time left on the other claimant's lease.
        retry_after: Duration,
    },
    /// An earlier attempt recorded its intent to call an external system and never recorded the
    /// result, and the step's policy is [`OnUnknown::Park`]: a person must decide.
    #[error(
        "step `{step}`: outcome of an earlier call with idempotency key {idempotency_key} is unknown; parked for a person: \
         find out from the external system, settle the ledger record \
         (`oncely ledger resolve {ns} '{key}' --took-effect '<output JSON>'` or `--did-not-take-effect`), then retry the job",
        ns = .record.namespace,
        key = .record.key
    )]
    OutcomeUnknown {
        /// The step name.
        step: String,
        /// The idempotency key the earlier call used.
        idempotency_key: String,
        /// The ledger record to settle with [`ledger::resolve`](crate::ledger::resolve).
        record: LedgerKey,
    },
    /// The same step key was used twice in one attempt. Give steps in a loop explicit keys.
    #[error("step key `{0}` used twice in one job attempt; give steps in a loop explicit keys with .key(..)")]
    DuplicateKey(String),
    /// The key is recorded with a different fingerprint.
    #[error("step `{step}`: the key was already used for a different request")]
    Mismatch {
        /// The step name.
        step: String,
    },
    /// The ledger could not be read or written.
    #[error("step `{step}`: {source}")]
    Ledger {
        /// The step name.
        step: String,
        /// The underlying error.
        #[source]
        source: crate::Error,
    },
    /// The output did not serialize, or the stored output did not deserialize into the step's type.
    #[error("step `{step}`: output does not match its type: {source}")]
    Output {
        /// The step name.
        step: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// Defaults to 24 hours, Stripe's: how long after its first call an [`OnUnknown::RetrySameKey`]
/// step still calls again with the same key. Past it the callee may have forgotten the key.
pub const DEFAULT_CALLEE_KEY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A reconciliation callback: given the idempotency key, did the earlier call take effect?
pub type Reconciler<T> = Box<dyn FnOnce(String) -> BoxFuture<'static, Result<Option<T>, BoxError>> + Send>;

/// What an external step does when an earlier attempt's call has an unknown outcome (the process
/// died between recording its intent and recording the result).
pub enum OnUnknown<T> {
    /// Call again with the same idempotency key: right when the callee deduplicates on it (Stripe,
    /// Standard Webhooks receivers) — for as long as it remembers the key. Callees forget keys
    /// (Stripe after 24 hours), so this is [`OnUnknown::RetrySameKeyWithin`] the
    /// [`DEFAULT_CALLEE_KEY_WINDOW`] of 24 hours from the first call: past it the step parks, as
    /// with [`OnUnknown::Park`], because calling again could repeat the effect.
    RetrySameKey,
    /// Call again with the same idempotency key while the first call with it is younger than
    /// this (how long the callee keeps keys; `Duration::MAX` for one that keeps them forever);
    /// past it, park.
    RetrySameKeyWithin(Duration),
    /// Ask the external system: `Some(output)` means the call took effect (it is recorded and
    /// returned), `None` that it did not (the call runs).
    Reconcile(Reconciler<T>),
    /// Fail the step with [`StepError::OutcomeUnknown`] (the worker dead-letters the job) so a
    /// person decides.
    Park,
}

impl<T> OnUnknown<T> {
    /// [`OnUnknown::Reconcile`] from an async closure given the idempotency key.
    pub fn reconcile<F, Fut>(f: F) -> Self
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<T>, BoxError>> + Send + 'static,
    {
        OnUnknown::Reconcile(Box::new(move |key| Box::pin(f(key))))
    }
}

impl<T> std::fmt::Debug for OnUnknown<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnUnknown::RetrySameKey => "RetrySameKey",
            OnUnknown::RetrySameKeyWithin(_) => "RetrySameKeyWithin(..)",
            OnUnknown::Reconcile(_) => "Reconcile(..)",
            OnUnknown::Park => "Park",
        })
    }
}

/// One effect to run once under a ledger key.
pub(crate) struct Effect<'a> {
    pub(crate) pool: &'a PgPool,
    pub(crate) label: &'a str,
    pub(crate) key: LedgerKey,
    pub(crate) owner: String,
    pub(crate) supersedes: Option<String>,
    pub(crate) lease: Duration,
    pub(crate) ttl: Option<Duration>,
    pub(crate) hook: Option<(&'a BoundaryHook, JobId)>,
    /// What the call was; a later call under the key with another gets [`StepError::Mismatch`].
    pub(crate) fingerprint: Option<String>,
    /// How long a call that finds the key held by a running call waits for its result.
    pub(crate) wait: Duration,
}

impl Effect<'_> {
    fn at(&self, point: BoundaryPoint) {
        if let Some((hook, job_id)) = self.hook {
            hook(&Boundary { job_id, step: self.label.to_owned(), point });
        }
    }

    fn opts(&self) -> ClaimOptions<'_> {
        ClaimOptions {
            owner: &self.owner,
            fingerprint: self.fingerprint.as_deref(),
            lease: self.lease,
            ttl: self.ttl,
            supersedes: self.supersedes.as_deref(),
            now: None,
            read_first: false,
        }
    }

    fn ledger_err(&self, source: crate::Error) -> StepError {
        StepError::Ledger { step: self.label.to_owned(), source }
    }

    fn decode<T: DeserializeOwned>(&self, v: serde_json::Value) -> Result<T, StepError> {
        serde_json::from_value(v).map_err(|source| StepError::Output { step: self.label.to_owned(), source })
    }

    fn encode<T: Serialize>(&self, v: &T) -> Result<serde_json::Value, StepError> {
        serde_json::to_value(v).map_err(|source| StepError::Output { step: self.label.to_owned(), source })
    }

    /// Count how a step (or an idempotent call) ended, in `oncely_step_outcomes_total`:
    /// `recorded` (ran and recorded), `replayed` (the stored output), `busy`, `mismatch`, `failed`,
    /// `parked`. Through the `metrics` facade: nothing is recorded unless the process installed a
    /// recorder (`oncely serve`, or the dashboard's `telemetry::install_prometheus`).
    fn outcome(&self, outcome: &'static str) {
        metrics::counter!(STEP_OUTCOMES, "namespace" => self.key.namespace.clone(), "outcome" => outcome).increment(1);
    }

    fn not_run(&self, c: Claimed) -> Result<serde_json::Value, StepError> {
        match c {
            Claimed::Completed(v) => {
                self.outcome("replayed");
                Ok(v)
            }
            Claimed::Busy { retry_after } => {
                self.outcome("busy");
                Err(StepError::Busy { step: self.label.to_owned(), key: self.key.to_string(), retry_after })
            }
            Claimed::Mismatch => {
                self.outcome("mismatch");
                Err(StepError::Mismatch { step: self.label.to_owned() })
            }
            Claimed::Run { .. } => unreachable!("not_run is only called for claims that do not run"),
        }
    }

    /// Claim, run `f` outside any transaction, record. A crash between `f` and the record runs `f`
    /// again (or applies `on_unknown`): at least once, effectively once with a deduplicating callee.
    pub(crate) async fn run<T, E, F, Fut>(self, on_unknown: OnUnknown<T>, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        self.at(BoundaryPoint::BeforeClaim);
        // A call that finds the key held by a running one waits up to `wait` for its result.
        let start = tokio::time::Instant::now();
        // `Duration::MAX` means "as long as it takes".
        let deadline = start.checked_add(self.wait).unwrap_or(start + Duration::from_secs(100 * 365 * 24 * 3600));
        let mut pause = Duration::from_millis(5);
        let claimed = loop {
            let claimed = async {
                if crate::pooler::transaction_pooling() {
                    // Behind a transaction pooler: the claim's statements in a transaction of their own.
                    let mut tx = crate::txn::begin(self.pool).await?;
                    let claimed = ledger::claim(&mut tx, &self.key, &self.opts()).await?;
                    tx.commit().await?;
                    return Ok(claimed);
                }
                let mut conn = self.pool.acquire().await?;
                ledger::claim(&mut conn, &self.key, &self.opts()).await
            }
            .await
            .map_err(|e| self.ledger_err(e))?;
            let now = tokio::time::Instant::now();
            match claimed {
                Claimed::Busy { retry_after } if now < deadline => {
                    tokio::time::sleep(pause.min(retry_after.max(Duration::from_millis(1))).min(deadline - now)).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                other => break other,
            }
        };
        let (attempt, took_over_from) = match claimed {
            Claimed::Run { attempt, took_over_from, intent_age } => (attempt, took_over_from.map(|p| (p, intent_age))),
            other => return self.decode(self.not_run(other)?),
        };
        let idempotency_key = self.key.idempotency_key();
        if let Some((previous, intent_age)) = took_over_from {
            let on_unknown = match on_unknown {
                OnUnknown::RetrySameKey => OnUnknown::RetrySameKeyWithin(DEFAULT_CALLEE_KEY_WINDOW),
                other => other,
            };
            match on_unknown {
                OnUnknown::RetrySameKeyWithin(window) if intent_age < window => {
                    tracing::warn!(step = self.label, %previous, %idempotency_key, "earlier attempt left no result; calling again with the same key");
                }
                OnUnknown::RetrySameKey | OnUnknown::RetrySameKeyWithin(_) => {
                    // The callee may have forgotten the key by now: calling again could do it twice.
                    tracing::error!(step = self.label, %previous, %idempotency_key, ?intent_age, record = %self.key, "earlier attempt left no result and its key is older than the callee keeps keys; parking for a person");
                    return Err(self.park(attempt, idempotency_key).await);
                }
                OnUnknown::Park => {
                    tracing::error!(step = self.label, %previous, %idempotency_key, record = %self.key, "earlier attempt left no result; parking for a person");
                    return Err(self.park(attempt, idempotency_key).await);
                }
                // Asking the other system can take a while: keep the claim meanwhile.
                OnUnknown::Reconcile(reconcile) => {
                    match self.heartbeat(attempt, reconcile(idempotency_key.clone())).await {
                        Ok(Some(v)) => {
                            tracing::info!(step = self.label, %previous, "reconciled: the earlier call took effect");
                            return self.record(attempt, v).await;
                        }
                        Ok(None) => {
                            tracing::info!(step = self.label, %previous, "reconciled: the earlier call did not take effect");
                            // Call only while the claim is still ours: if it lapsed during the
                            // reconciliation, someone else may be calling (or a person settled it).
                            ledger::extend(crate::pooler::db(self.pool), &self.key, attempt, self.lease)
                                .await
                                .map_err(|e| self.ledger_err(e))?;
                        }
                        Err(source) => {
                            self.outcome("failed");
                            return Err(StepError::Failed { step: self.label.to_owned(), source });
                        }
                    }
                }
            }
        }
        match self.heartbeat(attempt, f(idempotency_key)).await {
            Ok(v) => self.record(attempt, v).await,
            Err(e) => {
                // The effect did not happen (or may be repeated under the same key): let the next
                // attempt run it from scratch.
                if let Err(release) = ledger::release(crate::pooler::db(self.pool), &self.key, attempt).await {
                    tracing::warn!(step = self.label, error = %release, "could not release the step's claim; it expires with its lease");
                }
                self.outcome("failed");
                Err(StepError::Failed { step: self.label.to_owned(), source: e.into() })
            }
        }
    }

    /// Park the step for a person. Nobody works on it now: end this claim's lease so a person can
    /// resolve the record at once, and keep the record until then (it stays in progress, so every
    /// claimant parks; were it to expire, a later claim would call again as if nothing happened).
    async fn park(&self, attempt: i32, idempotency_key: String) -> StepError {
        self.outcome("parked");
        if let Err(e) = ledger::park(crate::pooler::db(self.pool), &self.key, attempt).await {
            tracing::warn!(step = self.label, error = %e, "could not mark the claim parked; its lease ends on its own");
        }
        StepError::OutcomeUnknown { step: self.label.to_owned(), idempotency_key, record: self.key.clone() }
    }

    /// Run `work` while extending claim `attempt`'s lease every third of it: a claimant still at
    /// work keeps its key however long the work takes, and only a dead one's claim expires.
    async fn heartbeat<R>(&self, attempt: i32, work: impl Future<Output = R>) -> R {
        let beat = async {
            let mut tick = tokio::time::interval((self.lease / 3).max(Duration::from_millis(10)));
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = ledger::extend(crate::pooler::db(self.pool), &self.key, attempt, self.lease).await {
                    tracing::warn!(step = self.label, error = %e, "could not extend the step's claim");
                }
            }
        };
        futures::pin_mut!(work, beat);
        match futures::future::select(work, beat).await {
            futures::future::Either::Left((out, _)) => out,
            futures::future::Either::Right(((), _)) => unreachable!("the heartbeat loop never ends"),
        }
    }

    async fn record<T: Serialize>(&self, attempt: i32, v: T) -> Result<T, StepError> {
        let json = self.encode(&v)?;
        self.at(BoundaryPoint::BeforeRecord);
        ledger::complete(crate::pooler::db(self.pool), &self.key, attempt, &json, self.ttl)
            .await
            .map_err(|e| self.ledger_err(e))?;
        self.outcome("recorded");
        self.at(BoundaryPoint::AfterRecord);
        Ok(v)
    }

    /// Claim, run `f` and record in one transaction: exactly once for effects in this database.
    /// A memoized step on a job's first attempt ([`crate::step::StepScope::with_deferred_records`]):
    /// no record of it can exist yet and the job's lease keeps other attempts away, so `f` runs at
    /// once and its record joins the attempt's deferred records, written with the attempt's
    /// outcome. A crash before that runs `f` again, as a crash between `f` and its record always
    /// does for a memoized step.
    pub(crate) async fn run_deferred<T, E, F, Fut>(
        self,
        records: &crate::step::DeferredRecords,
        f: F,
    ) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        self.at(BoundaryPoint::BeforeClaim);
        let at = records.now();
        let v = match f().await {
            Ok(v) => v,
            Err(e) => {
                self.outcome("failed");
                return Err(StepError::Failed { step: self.label.to_owned(), source: e.into() });
            }
        };
        let output = self.encode(&v)?;
        self.at(BoundaryPoint::BeforeRecord);
        records.push(ledger::DeferredRecord {
            key: self.key.clone(),
            owner: self.owner.clone(),
            output,
            ttl: self.ttl,
            at,
        });
        if records.len() >= crate::step::MAX_DEFERRED_RECORDS {
            records.flush(crate::pooler::db(self.pool)).await.map_err(|e| self.ledger_err(e))?;
        }
        self.outcome("recorded");
        self.at(BoundaryPoint::AfterRecord);
        Ok(v)
    }

    /// A transactional step on a job's first attempt: no claim first (no record of it can exist
    /// yet), just `f` and one `INSERT` of its record, with the attempt's deferred records, in
    /// the same transaction. The record's primary key still decides between this attempt and a
    /// later one running concurrently (this one being a zombie): whoever inserts second waits
    /// for the first and writes nothing, and then rolls back its effect and replays the record.
    pub(crate) async fn transactional_unclaimed<T, E, F>(
        self,
        records: &crate::step::DeferredRecords,
        f: F,
    ) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<T, E>>,
        E: Into<BoxError>,
    {
        self.at(BoundaryPoint::BeforeClaim);
        let at = records.now();
        let tx = crate::txn::begin(self.pool).await.map_err(|e| self.ledger_err(e.into()))?;
        let (mut tx, v) = self.run_in(tx, f).await?;
        let output = self.encode(&v)?;
        let mut batch = records.take();
        batch.push(ledger::DeferredRecord {
            key: self.key.clone(),
            owner: self.owner.clone(),
            output,
            ttl: self.ttl,
            at,
        });
        let written = match ledger::record_many(&mut *tx, &batch).await {
            Ok(written) => written,
            Err(e) => {
                batch.pop();
                records.restore(batch);
                return Err(self.ledger_err(e));
            }
        };
        batch.pop();
        if !written.contains(&self.key) {
            // Another attempt recorded this step (or holds its claim): undo ours, take theirs.
            let _ = tx.rollback().await;
            records.restore(batch);
            tracing::warn!(step = self.label, "another attempt recorded this step first; its result stands");
            // (A rare path: in a transaction of its own, which also suits a transaction pooler.)
            let existing = async {
                let mut tx = crate::txn::begin(self.pool).await?;
                let claimed =
                    ledger::claim(&mut tx, &self.key, &ClaimOptions { read_first: true, ..self.opts() }).await?;
                tx.commit().await?;
                Ok::<_, crate::Error>(claimed)
            }
            .await
            .map_err(|e| self.ledger_err(e))?;
            return match existing {
                Claimed::Run { attempt, .. } => {
                    // It vanished meanwhile: give the claim back, and let the next attempt run the
                    // step from scratch.
                    let _ = ledger::release(crate::pooler::db(self.pool), &self.key, attempt).await;
                    self.outcome("busy");
                    Err(StepError::Busy {
                        step: self.label.to_owned(),
                        key: self.key.to_string(),
                        retry_after: Duration::from_secs(1),
                    })
                }
                other => self.decode(self.not_run(other)?),
            };
        }
        self.at(BoundaryPoint::BeforeRecord);
        if let Err(e) = tx.commit().await {
            // The deferred records were in the rolled-back transaction: keep them for later.
            records.restore(batch);
            return Err(self.ledger_err(e.into()));
        }
        self.outcome("recorded");
        self.at(BoundaryPoint::AfterRecord);
        Ok(v)
    }

    /// Run the effect `f` in `tx`. An error rolls the transaction back and fails the step.
    async fn run_in<T, E, F>(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        f: F,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, T), StepError>
    where
        F: for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<T, E>>,
        E: Into<BoxError>,
    {
        match f(&mut tx).await {
            Ok(v) => Ok((tx, v)),
            Err(e) => {
                let _ = tx.rollback().await;
                self.outcome("failed");
                Err(StepError::Failed { step: self.label.to_owned(), source: e.into() })
            }
        }
    }

    pub(crate) async fn transactional<T, E, F>(self, f: F) -> Result<T, StepError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'c> FnOnce(&'c mut sqlx::PgConnection) -> BoxFuture<'c, Result<T, E>>,
        E: Into<BoxError>,
    {
        self.at(BoundaryPoint::BeforeClaim);
        let mut tx = crate::txn::begin(self.pool).await.map_err(|e| self.ledger_err(e.into()))?;
        let claimed = ledger::claim(&mut tx, &self.key, &self.opts()).await.map_err(|e| self.ledger_err(e))?;
        let attempt = match claimed {
            Claimed::Run { attempt, .. } => attempt,
            other => {
                let _ = tx.rollback().await;
                return self.decode(self.not_run(other)?);
            }
        };
        let (mut tx, v) = self.run_in(tx, f).await?;
        let json = self.encode(&v)?;
        ledger::complete(&mut *tx, &self.key, attempt, &json, self.ttl).await.map_err(|e| self.ledger_err(e))?;
        self.at(BoundaryPoint::BeforeRecord);
        tx.commit().await.map_err(|e| self.ledger_err(e.into()))?;
        self.outcome("recorded");
        self.at(BoundaryPoint::AfterRecord);
        Ok(v)
    }
}
