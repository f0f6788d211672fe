//! The effect ledger: one record per "do this once" key, and one claim algorithm.
//!
//! A record is a key in a namespace with a request fingerprint, a state (`in_progress` under a
//! lease, or `completed` with the stored output), an attempt counter and an expiry. Job steps
//! ([`crate::step`]), [`with_idempotency`](crate::with_idempotency) and the HTTP middleware all
//! use it.
//!
//! [`claim`] decides, atomically and under concurrent claims on separate connections, which one
//! caller runs: it gets [`Claimed::Run`]; the others get the stored output
//! ([`Claimed::Completed`]), [`Claimed::Busy`] while a live lease is held, or
//! [`Claimed::Mismatch`] when the same key comes with a different fingerprint. A claim whose lease
//! expired (its holder died) can be taken over, and a job step's claim is superseded at once by a
//! *later* attempt of the same job ([`ClaimOptions::supersedes`]) — never by an earlier one, so a
//! zombie attempt cannot take a key over from the attempt that replaced it. The old holder's later
//! writes are fenced out by the claim's attempt number.
//!
//! Run inside a transaction together with the effect, the claim is invisible to others until the
//! commit, and concurrent claimants wait on the row: effect and record commit together, or neither.

pub(crate) mod sql;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row};

use crate::error::{Error, Result};

/// A ledger key: a namespace and a key within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LedgerKey {
    /// E.g. `step`, `idempotency`, `http:{caller}`.
    pub namespace: String,
    /// The key within the namespace.
    pub key: String,
}

impl LedgerKey {
    /// A key in a namespace.
    pub fn new(namespace: impl Into<String>, key: impl Into<String>) -> Self {
        LedgerKey { namespace: namespace.into(), key: key.into() }
    }

    /// The stable idempotency key to hand an external system for this record: identical on every
    /// retry, derived only from the namespace and key (never from time), 71 characters.
    ///
    /// ```
    /// let k = oncely_core::ledger::LedgerKey::new("step", "usage:report:7");
    /// assert_eq!(k.idempotency_key(), k.clone().idempotency_key());
    /// assert!(k.idempotency_key().starts_with("oncely_"));
    /// ```
    pub fn idempotency_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.namespace.as_bytes());
        h.update([0u8]);
        h.update(self.key.as_bytes());
        let digest = h.finalize();
        let mut out = String::with_capacity(71);
        out.push_str("oncely_");
        for b in digest {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    fn validate(&self) -> Result<()> {
        crate::job::check_len("ledger namespace", &self.namespace, 255)?;
        crate::job::check_len("ledger key", &self.key, 1024)
    }
}

impl std::fmt::Display for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.key)
    }
}

/// How to claim a key.
#[derive(Debug, Clone)]
pub struct ClaimOptions<'a> {
    /// Who claims (recorded; e.g. `job:42:3`).
    pub owner: &'a str,
    /// What the request was; a later claim with a different one gets [`Claimed::Mismatch`].
    pub fingerprint: Option<&'a str>,
    /// How long the claim holds before another claimant may take it over.
    pub lease: Duration,
    /// How long the record lives (from the claim, and again from completion); `None`: forever.
    pub ttl: Option<Duration>,
    /// An owner prefix followed by attempt numbers (`job:42:` for the attempts of job 42): this
    /// claim's `owner` must then be the prefix followed by its own attempt (`job:42:3`), and it
    /// supersedes at once, lease or not, an in-progress claim of an *earlier* attempt under the same
    /// prefix (`job:42:2`) — that attempt is over by the time a later one runs. Never a claim of the
    /// same or a later attempt: a zombie (an older attempt still running after its job lease was
    /// lost) cannot take a key over from the attempt that replaced it. Attempts compare as numbers.
    pub supersedes: Option<&'a str>,
    /// The clock, for tests; `None` is the database clock.
    pub now: Option<DateTime<Utc>>,
    /// Read the record before claiming: a completed record is then answered without a write (no
    /// row lock, no commit). Worth it where repeats are common (HTTP retries); a wasted round trip
    /// where most claims are new (job steps).
    pub read_first: bool,
}

/// What [`claim`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// The caller holds the key and runs the effect, then calls [`complete`] (or [`release`]).
    Run {
        /// The claim's attempt number: the fencing token for [`complete`] and [`release`].
        attempt: i32,
        /// Set when this claim took over an in-progress record whose holder never recorded a
        /// result: if that holder made an external call, its outcome is unknown.
        took_over_from: Option<String>,
        /// How long ago the record's first claim was made (database clock): when a callee
        /// forgets idempotency keys after a while, how old the key it was first sent is.
        intent_age: Duration,
    },
    /// The effect already happened: here is its stored output.
    Completed(serde_json::Value),
    /// Another caller holds a live claim.
    Busy {
        /// Time left on its lease.
        retry_after: Duration,
    },
    /// The key was used with a different fingerprint.
    Mismatch,
}

/// Claim `key`. See the [module docs](self) for the algorithm; run it in a transaction to make the
/// claim, the effect and [`complete`] atomic.
pub async fn claim(conn: &mut sqlx::PgConnection, key: &LedgerKey, opts: &ClaimOptions<'_>) -> Result<Claimed> {
    key.validate()?;
    let superseding_attempt = opts.supersedes.map(|prefix| owner_attempt(opts.owner, prefix)).transpose()?;
    // Fast path: a completed record answers without a write.
    let existing = match opts.read_first {
        true => {
            crate::pooler::query(sql::LEDGER_GET)
                .bind(&key.namespace)
                .bind(&key.key)
                .bind(opts.now)
                .fetch_optional(&mut *conn)
                .await?
        }
        false => None,
    };
    if let Some(row) = existing {
        if row.try_get::<String, _>("state")? == "completed" {
            if row.try_get::<Option<String>, _>("fingerprint")?.as_deref() != opts.fingerprint {
                return Ok(Claimed::Mismatch);
            }
            return Ok(Claimed::Completed(row.try_get::<Option<serde_json::Value>, _>("output")?.unwrap_or_default()));
        }
    }
    // A record can vanish between the two statements (released or deleted): claim again.
    for _ in 0..3 {
        let row = crate::pooler::query(sql::LEDGER_CLAIM)
            .bind(&key.namespace)
            .bind(&key.key)
            .bind(opts.fingerprint)
            .bind(opts.owner)
            .bind(opts.lease.as_secs_f64())
            .bind(opts.ttl.map(|d| d.as_secs_f64()))
            .bind(opts.supersedes)
            .bind(opts.now)
            .bind(superseding_attempt)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            return Ok(Claimed::Run {
                attempt: row.try_get("attempt")?,
                took_over_from: row.try_get("previous_owner")?,
                intent_age: Duration::from_secs_f64(row.try_get::<f64, _>("intent_age")?),
            });
        }
        let Some(row) = crate::pooler::query(sql::LEDGER_GET)
            .bind(&key.namespace)
            .bind(&key.key)
            .bind(opts.now)
            .fetch_optional(&mut *conn)
            .await?
        else {
            continue;
        };
        if row.try_get::<Option<String>, _>("fingerprint")?.as_deref() != opts.fingerprint {
            return Ok(Claimed::Mismatch);
        }
        return Ok(match row.try_get::<String, _>("state")?.as_str() {
            "completed" => {
                Claimed::Completed(row.try_get::<Option<serde_json::Value>, _>("output")?.unwrap_or_default())
            }
            _ => Claimed::Busy { retry_after: Duration::from_secs_f64(row.try_get::<f64, _>("lease_left")?) },
        });
    }
    Err(Error::InvalidInput(format!("ledger key {key} kept vanishing while being claimed")))
}

/// The attempt number in `owner` after `prefix` (`job:42:3` after `job:42:` is 3), or a typed error
/// when `owner` is not the prefix followed by a number.
fn owner_attempt(owner: &str, prefix: &str) -> Result<i64> {
    owner
        .strip_prefix(prefix)
        .filter(|n| (1..=18).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "ledger owner `{owner}` must be the supersede prefix `{prefix}` followed by an attempt number"
            ))
        })
}

/// A step's result recorded without a claim, to be written later together with others (on a
/// job's first attempt no record of its own steps can exist yet, so the worker runs a memoized
/// step at once and writes its record with the attempt's outcome; see [`crate::step`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DeferredRecord {
    /// The record's key.
    pub key: LedgerKey,
    /// Who made it, e.g. `job:42:1`.
    pub owner: String,
    /// The step's output.
    pub output: serde_json::Value,
    /// How long the record is kept; `None`: forever.
    pub ttl: Option<Duration>,
    /// When the step started (its record's `created_at`, which orders a run's steps).
    pub at: DateTime<Utc>,
}

/// The columns of deferred records, as the arrays the statements bind.
pub(crate) struct DeferredColumns {
    pub(crate) namespaces: Vec<String>,
    pub(crate) keys: Vec<String>,
    pub(crate) owners: Vec<String>,
    pub(crate) outputs: Vec<serde_json::Value>,
    pub(crate) ttls: Vec<Option<f64>>,
    pub(crate) ats: Vec<DateTime<Utc>>,
}

impl DeferredColumns {
    /// Bind the six arrays, in the order of `sql::ledger_record_many!`'s placeholders.
    pub(crate) fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.namespaces)
            .bind(&self.keys)
            .bind(&self.owners)
            .bind(&self.outputs)
            .bind(&self.ttls)
            .bind(&self.ats)
    }

    pub(crate) fn of(records: &[DeferredRecord]) -> Result<Self> {
        let mut c = DeferredColumns {
            namespaces: Vec::with_capacity(records.len()),
            keys: Vec::with_capacity(records.len()),
            owners: Vec::with_capacity(records.len()),
            outputs: Vec::with_capacity(records.len()),
            ttls: Vec::with_capacity(records.len()),
            ats: Vec::with_capacity(records.len()),
        };
        for r in records {
            r.key.validate()?;
            c.namespaces.push(r.key.namespace.clone());
            c.keys.push(r.key.key.clone());
            c.owners.push(r.owner.clone());
            c.outputs.push(r.output.clone());
            c.ttls.push(r.ttl.map(|d| d.as_secs_f64()));
            c.ats.push(r.at);
        }
        Ok(c)
    }
}

/// Write deferred records in one statement. A key that already has a record (a claim or a result
/// of another attempt) keeps it; returns the keys that were written.
pub async fn record_many<'e>(executor: impl PgExecutor<'e>, records: &[DeferredRecord]) -> Result<Vec<LedgerKey>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let c = DeferredColumns::of(records)?;
    let rows = c.bind(crate::pooler::query(sql::LEDGER_RECORD_BATCH)).fetch_all(executor).await?;
    rows.iter().map(|r| Ok(LedgerKey::new(r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?))).collect()
}

/// Record the output of claim `attempt`; `ttl` restarts the record's expiry from now. Refused with
/// [`Error::LedgerClaimLost`] when another claimant took the key over meanwhile.
pub async fn complete<'e>(
    executor: impl PgExecutor<'e>,
    key: &LedgerKey,
    attempt: i32,
    output: &serde_json::Value,
    ttl: Option<Duration>,
) -> Result<()> {
    crate::pooler::query(sql::LEDGER_COMPLETE)
        .bind(&key.namespace)
        .bind(&key.key)
        .bind(attempt)
        .bind(output)
        .bind(ttl.map(|d| d.as_secs_f64()))
        .fetch_optional(executor)
        .await?
        .map(|_| ())
        .ok_or_else(|| Error::LedgerClaimLost { key: key.to_string(), attempt })
}

/// Extend claim `attempt`'s lease to `lease` from now, so that a holder still at work keeps its
/// key (a heartbeat). Refused with [`Error::LedgerClaimLost`] when the claim was taken over or
/// finished.
pub async fn extend<'e>(executor: impl PgExecutor<'e>, key: &LedgerKey, attempt: i32, lease: Duration) -> Result<()> {
    crate::pooler::query(sql::LEDGER_EXTEND)
        .bind(&key.namespace)
        .bind(&key.key)
        .bind(attempt)
        .bind(lease.as_secs_f64())
        .fetch_optional(executor)
        .await?
        .map(|_| ())
        .ok_or_else(|| Error::LedgerClaimLost { key: key.to_string(), attempt })
}

/// Park claim `attempt`: its outcome is unknown and a person will settle it with [`resolve`]. Its
/// lease ends now (nobody works on it) and the record no longer expires, so it can neither be
/// cleaned up nor claimed afresh before it is settled.
pub async fn park<'e>(executor: impl PgExecutor<'e>, key: &LedgerKey, attempt: i32) -> Result<()> {
    crate::pooler::query(
        "UPDATE oncely.ledger SET lease_expires_at = now(), expires_at = NULL, updated_at = now() \
         WHERE namespace = $1 AND key = $2 AND attempt = $3 AND state = 'in_progress' RETURNING attempt",
    )
    .bind(&key.namespace)
    .bind(&key.key)
    .bind(attempt)
    .fetch_optional(executor)
    .await?
    .map(|_| ())
    .ok_or_else(|| Error::LedgerClaimLost { key: key.to_string(), attempt })
}

/// Forget claim `attempt` when the effect did not happen (it failed cleanly), so the next claimant
/// runs it from scratch. A claim already taken over is left alone.
pub async fn release<'e>(executor: impl PgExecutor<'e>, key: &LedgerKey, attempt: i32) -> Result<()> {
    crate::pooler::query(sql::LEDGER_RELEASE)
        .bind(&key.namespace)
        .bind(&key.key)
        .bind(attempt)
        .execute(executor)
        .await?;
    Ok(())
}

/// What a person found out about an effect whose outcome was unknown (a step parked by
/// [`OnUnknown::Park`](crate::step::OnUnknown::Park)).
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The effect happened, and this is its output: the step's return value as JSON (e.g. the
    /// provider's charge id). The next attempt returns it without calling again.
    TookEffect(serde_json::Value),
    /// The effect did not happen: the record is forgotten and the next attempt runs it.
    DidNotTakeEffect,
}

/// Settle by hand an in-progress record whose claimant is gone — typically a parked step, after
/// checking with the external system — then retry the job (`oncely jobs retry`).
///
/// Refused with [`Error::LedgerNotResolvable`] when there is no such record, when it is already
/// completed, or while a live claim holds it (someone is running the effect right now).
pub async fn resolve<'e>(executor: impl PgExecutor<'e>, key: &LedgerKey, resolution: &Resolution) -> Result<()> {
    key.validate()?;
    let row = match resolution {
        Resolution::TookEffect(output) => {
            crate::pooler::query(sql::LEDGER_RESOLVE_TOOK_EFFECT).bind(&key.namespace).bind(&key.key).bind(output)
        }
        Resolution::DidNotTakeEffect => {
            crate::pooler::query(sql::LEDGER_RESOLVE_DID_NOT_TAKE_EFFECT).bind(&key.namespace).bind(&key.key)
        }
    }
    .fetch_one(executor)
    .await?;
    if row.try_get::<i64, _>("resolved")? > 0 {
        return Ok(());
    }
    let state: Option<String> = row.try_get("state")?;
    let live: Option<bool> = row.try_get("live")?;
    let reason = match (state.as_deref(), live) {
        (None, _) => "no such record (it never existed, or expired and was cleaned up)".to_owned(),
        (Some("completed"), _) => "already completed: its effect is recorded as done".to_owned(),
        (_, Some(true)) => {
            "a live claim holds it: the effect may be running right now; try again after its lease".to_owned()
        }
        (Some(other), _) => format!("in state {other}"),
    };
    Err(Error::LedgerNotResolvable { key: key.to_string(), reason })
}

/// Delete up to `limit` expired records; returns how many.
pub async fn delete_expired<'e>(executor: impl PgExecutor<'e>, limit: i64) -> Result<u64> {
    Ok(crate::pooler::query(sql::LEDGER_DELETE_EXPIRED).bind(limit).execute(executor).await?.rows_affected())
}

/// Delete every expired record in batches of `batch`, then write one audit record to
/// `oncely.maintenance_runs` (task `ledger_cleanup`, with the count). Returns how many.
pub async fn cleanup_expired(pool: &sqlx::PgPool, batch: i64, worker_id: Option<&str>) -> Result<u64> {
    let started: DateTime<Utc> = crate::pooler::query_scalar("SELECT now()").fetch_one(crate::pooler::db(pool)).await?;
    let total = delete_all_expired(pool, batch).await?;
    crate::maintenance::record_run(
        crate::pooler::db(pool),
        crate::maintenance::LEDGER_CLEANUP_TASK,
        worker_id,
        started,
        total,
    )
    .await?;
    Ok(total)
}

/// Delete every expired record in batches of `batch`, without an audit record; returns how many.
pub async fn delete_all_expired(pool: &sqlx::PgPool, batch: i64) -> Result<u64> {
    let mut total = 0;
    loop {
        let n = delete_expired(crate::pooler::db(pool), batch).await?;
        total += n;
        if (n as i64) < batch {
            return Ok(total);
        }
    }
}
