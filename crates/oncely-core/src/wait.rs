//! Durable waits of function runs: wait for an event ([`wait_for_event`]) and cancel on an event
//! ([`register_cancel`]).
//!
//! A wait is a row of `oncely.event_waits`: a run, a topic, a payload path and the value it must
//! have. [`publish`](crate::outbox::publish) resolves, in its statement, the unresolved waits its
//! events match (through the index on `(topic, path, value)` of unresolved waits), and wakes the
//! waiting run (or cancels it, for [`register_cancel`]).
//!
//! # Which events count
//!
//! A wait counts every matching event committed after its registration, and every matching event
//! published (its transaction's start, database clock) at or after `since` = registration time
//! minus the look-back, even if it committed before. The first matching event (lowest id among
//! those one statement sees) resolves the wait; later ones are ignored by it.
//!
//! # Why an event committed concurrently with the registration is never lost nor delivered twice
//!
//! Under READ COMMITTED a publisher and a registration can each miss the other's uncommitted row.
//! Both take a transaction lock on `hash(topic, path, value)` (the publisher shared, the
//! registration exclusive) and do their lookup in a new statement after it, with a fresh snapshot.
//! If the publisher gets its lock first, the registration waits until the publisher committed,
//! then its lookup sees the event. If the registration gets it first, the publisher waits until the
//! wait committed, then its lookup sees the wait. Both may see each other: the wait row is resolved
//! by an `UPDATE … WHERE resolved_at IS NULL`, and the row lock makes the second one find it
//! resolved. A topic's payload paths are read by the publisher under a shared lock on the topic; a
//! registration adding a new path takes that lock exclusively first and commits the path, so every
//! publisher either sees the path or committed before the path did. Publishers must run under READ
//! COMMITTED (PostgreSQL's default): under REPEATABLE READ the lookup after the lock would reuse the
//! transaction's snapshot.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use crate::error::{Error, Result};
use crate::lease::Claim;
use crate::outbox::{StoredEvent, EVENT_COLUMNS};

/// What a wait is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// `wait_for_event`: the run is woken with the event.
    Event,
    /// `cancel_on`: the run is cancelled.
    Cancel,
}

impl WaitKind {
    fn as_str(self) -> &'static str {
        match self {
            WaitKind::Event => "event",
            WaitKind::Cancel => "cancel",
        }
    }
}

/// A wait to register.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitSpec {
    /// The step name (unique within the run).
    pub step: String,
    /// What it is for.
    pub kind: WaitKind,
    /// The awaited topic (exact).
    pub topic: String,
    /// The field of the awaited event's payload (dotted path split in parts).
    pub path: Vec<String>,
    /// The value it must have, as text (`payload #>> path`: a string without its quotes, other JSON
    /// values in their JSON text).
    pub value: String,
    /// Events published this long before the registration also count.
    pub look_back: Duration,
    /// Give up after this long (`None`: never, for cancellations). Measured from the first
    /// registration: a resumed run keeps its deadline.
    pub timeout: Option<Duration>,
}

impl WaitSpec {
    fn validate(&self) -> Result<()> {
        crate::outbox::validate_topic(&self.topic)?;
        if self.topic.contains('*') {
            return Err(Error::InvalidInput(format!("a wait needs an exact topic, got {:?}", self.topic)));
        }
        if self.path.is_empty() || self.path.iter().any(|p| p.is_empty()) {
            return Err(Error::InvalidInput(format!("invalid match path {:?}", self.path.join("."))));
        }
        crate::job::check_len("wait step name", &self.step, 255)?;
        Ok(())
    }
}

/// The text form of a JSON value, as PostgreSQL's `#>>` gives it.
pub fn match_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Where a wait stands.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitStatus {
    /// A matching event resolved it.
    Matched(StoredEvent),
    /// Its deadline passed first.
    TimedOut,
    /// Still waiting. For [`wait_for_event`], the run was suspended until `until` in the same
    /// transaction (its claim is over: the handler must return at once).
    Pending {
        /// Its deadline (`None`: none).
        until: Option<DateTime<Utc>>,
    },
}

fn topic_lock(topic: &str) -> String {
    format!("oncely.wait/{topic}")
}

fn value_lock(spec: &WaitSpec) -> String {
    format!("oncely.wait/{}/{}={}", spec.topic, spec.path.join("."), spec.value)
}

/// Make sure publishers of the topic read this path: committed before any wait on it, after every
/// publisher that could not see it has committed (the topic's lock, exclusively).
async fn ensure_path(pool: &PgPool, spec: &WaitSpec) -> Result<()> {
    let known: Option<i32> =
        crate::pooler::query_scalar("SELECT 1 FROM oncely.event_wait_paths WHERE topic = $1 AND path = $2")
            .bind(&spec.topic)
            .bind(&spec.path)
            .fetch_optional(crate::pooler::db(pool))
            .await?;
    if known.is_some() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    crate::pooler::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(topic_lock(&spec.topic))
        .execute(&mut *tx)
        .await?;
    crate::pooler::query("INSERT INTO oncely.event_wait_paths (topic, path) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(&spec.topic)
        .bind(&spec.path)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Register (or find again, on a resumed attempt) the wait of `claim`'s run and settle it:
/// matched by a committed event, timed out, or still pending. For a [`WaitKind::Event`] wait still
/// pending, the run is suspended until the deadline in the same transaction (a fenced snooze that
/// does not count as an attempt), so that a publisher that resolves the wait afterwards finds the
/// run suspended and wakes it; `before_commit` runs just before that commit (the worker marks the
/// attempt as finishing). A [`WaitKind::Cancel`] wait is never suspended on.
pub async fn wait_for_event(
    pool: &PgPool,
    claim: Claim,
    spec: &WaitSpec,
    before_commit: impl FnOnce(),
) -> Result<WaitStatus> {
    spec.validate()?;
    ensure_path(pool, spec).await?;
    let mut tx = pool.begin().await?;
    let status = settle(&mut tx, claim, spec).await;
    match status {
        Ok(status) => {
            if matches!(status, WaitStatus::Pending { .. }) && spec.kind == WaitKind::Event {
                before_commit();
            }
            tx.commit().await?;
            Ok(status)
        }
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

/// Register `claim`'s run as cancelled by a matching event (published after `since`, or committed
/// after this registration). Returns [`WaitStatus::Matched`] when such an event exists already.
pub async fn register_cancel(pool: &PgPool, claim: Claim, spec: &WaitSpec) -> Result<WaitStatus> {
    debug_assert_eq!(spec.kind, WaitKind::Cancel);
    wait_for_event(pool, claim, spec, || {}).await
}

async fn settle(tx: &mut PgConnection, claim: Claim, spec: &WaitSpec) -> Result<WaitStatus> {
    crate::pooler::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(value_lock(spec))
        .execute(&mut *tx)
        .await?;
    // New statements from here: their snapshots see every publisher that held the lock.
    let since_sql = match spec.kind {
        // A cancellation counts events since the run was created.
        WaitKind::Cancel => "(SELECT created_at FROM oncely.jobs WHERE id = $1) - make_interval(secs => $7)",
        WaitKind::Event => "now() - make_interval(secs => $7)",
    };
    crate::pooler::query(&format!(
        "INSERT INTO oncely.event_waits (run_id, step, kind, topic, path, value, since, timeout_at) \
         VALUES ($1, $2, $3, $4, $5, $6, coalesce({since_sql}, now()), now() + make_interval(secs => $8)) \
         ON CONFLICT (run_id, step) DO NOTHING"
    ))
    .bind(claim.id)
    .bind(&spec.step)
    .bind(spec.kind.as_str())
    .bind(&spec.topic)
    .bind(&spec.path)
    .bind(&spec.value)
    .bind(spec.look_back.as_secs_f64())
    .bind(spec.timeout.map(|t| t.as_secs_f64()))
    .execute(&mut *tx)
    .await?;
    let row = crate::pooler::query(
        "SELECT topic, path, value, since, timeout_at, resolved_at, event_id, now() >= timeout_at AS due \
         FROM oncely.event_waits WHERE run_id = $1 AND step = $2",
    )
    .bind(claim.id)
    .bind(&spec.step)
    .fetch_one(&mut *tx)
    .await?;
    let (topic, path, value): (String, Vec<String>, String) =
        (row.try_get("topic")?, row.try_get("path")?, row.try_get("value")?);
    if (topic.as_str(), &path, value.as_str()) != (spec.topic.as_str(), &spec.path, spec.value.as_str()) {
        return Err(Error::InvalidInput(format!(
            "wait `{}` of run {} was registered for {topic} {}={value}; this attempt asks for {} {}={}",
            spec.step,
            claim.id,
            path.join("."),
            spec.topic,
            spec.path.join("."),
            spec.value
        )));
    }
    let timeout_at: Option<DateTime<Utc>> = row.try_get("timeout_at")?;
    if row.try_get::<Option<DateTime<Utc>>, _>("resolved_at")?.is_some() {
        return match row.try_get::<Option<i64>, _>("event_id")? {
            Some(id) => Ok(WaitStatus::Matched(crate::outbox::get_event(&mut *tx, crate::outbox::EventId(id)).await?)),
            None => Ok(WaitStatus::TimedOut),
        };
    }
    let since: DateTime<Utc> = row.try_get("since")?;
    let found = crate::pooler::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM oncely.events e \
         WHERE e.topic = $1 AND e.payload #>> $2 = $3 AND e.created_at >= $4 ORDER BY e.id LIMIT 1"
    ))
    .bind(&spec.topic)
    .bind(&spec.path)
    .bind(&spec.value)
    .bind(since)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = found {
        let event = crate::outbox::event_from_row(&row)?;
        crate::pooler::query(
            "UPDATE oncely.event_waits SET resolved_at = now(), event_id = $3 \
             WHERE run_id = $1 AND step = $2 AND resolved_at IS NULL",
        )
        .bind(claim.id)
        .bind(&spec.step)
        .bind(event.id)
        .execute(&mut *tx)
        .await?;
        return Ok(WaitStatus::Matched(event));
    }
    if row.try_get::<Option<bool>, _>("due")?.unwrap_or(false) {
        let resolved = crate::pooler::query(
            "UPDATE oncely.event_waits SET resolved_at = now() WHERE run_id = $1 AND step = $2 AND resolved_at IS NULL",
        )
        .bind(claim.id)
        .bind(&spec.step)
        .execute(&mut *tx)
        .await?;
        if resolved.rows_affected() == 1 {
            return Ok(WaitStatus::TimedOut);
        }
        // A publisher resolved it meanwhile (it held the row): read what it wrote.
        let id: Option<i64> =
            crate::pooler::query_scalar("SELECT event_id FROM oncely.event_waits WHERE run_id = $1 AND step = $2")
                .bind(claim.id)
                .bind(&spec.step)
                .fetch_one(&mut *tx)
                .await?;
        return match id {
            Some(id) => Ok(WaitStatus::Matched(crate::outbox::get_event(&mut *tx, crate::outbox::EventId(id)).await?)),
            None => Ok(WaitStatus::TimedOut),
        };
    }
    if spec.kind == WaitKind::Event {
        // Suspend in this transaction: a publisher resolving the wait after our commit finds the
        // run suspended and wakes it. The run holds no slot meanwhile, and it is not an attempt.
        let delay: f64 = crate::pooler::query_scalar("SELECT greatest(extract(epoch FROM $1 - now())::float8, 0)")
            .bind(timeout_at)
            .fetch_one(&mut *tx)
            .await?;
        crate::lease::snooze_job(&mut *tx, claim, Duration::from_secs_f64(delay)).await?;
    }
    Ok(WaitStatus::Pending { until: timeout_at })
}

/// The resolved cancellation of a run, if any: `(event id, topic)`.
pub async fn cancellation<'e>(executor: impl sqlx::PgExecutor<'e>, run: crate::JobId) -> Result<Option<(i64, String)>> {
    let row: Option<(i64, String)> = crate::pooler::query_as(
        "SELECT event_id, topic FROM oncely.event_waits \
         WHERE run_id = $1 AND kind = 'cancel' AND event_id IS NOT NULL LIMIT 1",
    )
    .bind(run)
    .fetch_optional(executor)
    .await?;
    Ok(row)
}

/// One wait of a run, for its history.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitRecord {
    /// The step name.
    pub step: String,
    /// `event` (wait_for_event) or `cancel` (cancel_on).
    pub kind: String,
    /// The awaited topic.
    pub topic: String,
    /// The payload field and the value it must have (`order_id=42`).
    pub matching: String,
    /// When it was registered.
    pub registered_at: DateTime<Utc>,
    /// Its deadline, if any.
    pub timeout_at: Option<DateTime<Utc>>,
    /// When it was resolved (by an event or by its deadline).
    pub resolved_at: Option<DateTime<Utc>>,
    /// The event that resolved it (`None` with `resolved_at` set: it timed out).
    pub event_id: Option<i64>,
}

/// A run's waits, oldest first.
pub async fn run_waits<'e>(executor: impl sqlx::PgExecutor<'e>, run: crate::JobId) -> Result<Vec<WaitRecord>> {
    let rows = crate::pooler::query(
        "SELECT step, kind, topic, array_to_string(path, '.') || '=' || value AS matching, registered_at, timeout_at, \
                resolved_at, event_id \
         FROM oncely.event_waits WHERE run_id = $1 ORDER BY registered_at, step",
    )
    .bind(run)
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(WaitRecord {
                step: r.try_get("step")?,
                kind: r.try_get("kind")?,
                topic: r.try_get("topic")?,
                matching: r.try_get("matching")?,
                registered_at: r.try_get("registered_at")?,
                timeout_at: r.try_get("timeout_at")?,
                resolved_at: r.try_get("resolved_at")?,
                event_id: r.try_get("event_id")?,
            })
        })
        .collect()
}
