//! Delivery records: one row per (endpoint, event) with what was tried, the job that delivers it,
//! and every write an attempt makes, fenced by that job's claim.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool, Row};

use super::{disable_in, endpoint_from_row, Endpoint, EndpointId, ENDPOINT_COLUMNS};
use crate::error::{Error, Result};
use crate::job::{JobId, JobState};
use crate::lease::Claim;
use crate::outbox::{self, message_id, EventId};

/// Disable the endpoint of a delivery from inside the delivery's job (after a 410, or failing for
/// too long), and record `reason` as why that delivery died — fenced by the job's `claim` like
/// [`record_delivery_attempt`]: a worker whose lease was lost gets [`Error::LeaseLost`] and
/// neither disables the endpoint nor publishes anything. Returns false when it was already
/// disabled.
pub async fn disable_endpoint_for_delivery(
    pool: &PgPool,
    claim: Claim,
    endpoint: EndpointId,
    event: EventId,
    reason: &str,
) -> Result<bool> {
    let mut tx = crate::txn::begin(pool).await?;
    set_dead_reason(&mut *tx, claim, endpoint, event, reason).await?;
    let disabled = disable_in(&mut tx, endpoint, reason).await?;
    tx.commit().await?;
    if disabled {
        tracing::warn!(endpoint.id = %endpoint, job.id = %claim.id, attempt = claim.attempt, %reason, "webhook endpoint disabled");
    }
    Ok(disabled)
}

/// Record why a delivery is going to the dead letter (its endpoint is disabled, cannot be sent to,
/// or it ran out of attempts), shown by [`list_deliveries`] as [`Delivery::dead_reason`]. Fenced by
/// the delivery job's `claim` like [`record_delivery_attempt`].
pub async fn set_dead_reason<'e>(
    executor: impl PgExecutor<'e>,
    claim: Claim,
    endpoint: EndpointId,
    event: EventId,
    reason: &str,
) -> Result<()> {
    let row = crate::pooler::query(
        r#"
WITH fence AS (
    SELECT id FROM oncely.jobs WHERE id = $3 AND attempt = $4 AND state = 'running' FOR SHARE
), d AS (
    UPDATE oncely.webhook_deliveries SET dead_reason = $5
    WHERE endpoint_id = $1 AND event_id = $2 AND job_id = $3 AND EXISTS (SELECT 1 FROM fence)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM d) AS written,
       EXISTS (SELECT 1 FROM oncely.webhook_deliveries WHERE endpoint_id = $1 AND event_id = $2) AS found
"#,
    )
    .bind(endpoint)
    .bind(event)
    .bind(claim.id)
    .bind(claim.attempt)
    .bind(reason)
    .fetch_one(executor)
    .await?;
    match (row.try_get::<bool, _>("written")?, row.try_get::<bool, _>("found")?) {
        (true, _) => Ok(()),
        (false, true) => Err(Error::LeaseLost { job_id: claim.id, attempt: claim.attempt }),
        (false, false) => Err(Error::NotFound { what: "webhook delivery of event", id: event.0 }),
    }
}

/// Where a delivery stands: derived from its record and its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// A 2xx answer was recorded.
    Delivered,
    /// Waiting for its next attempt, or being attempted.
    Pending,
    /// Out of attempts, or failed for good (410, endpoint disabled): in the dead letter.
    Dead,
    /// Its job was cancelled.
    Cancelled,
    /// Not delivered, and its job has been pruned.
    Unknown,
}

/// One (endpoint, event) delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The endpoint.
    pub endpoint_id: EndpointId,
    /// The event.
    pub event_id: EventId,
    /// The `webhook-id` sent with every attempt.
    pub message_id: String,
    /// The job that delivers it.
    pub job_id: JobId,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made (requests sent, answered or not).
    pub attempts: i32,
    /// The last HTTP status received.
    pub last_status: Option<i32>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Why it went to the dead letter, when the attempts do not say it (endpoint disabled, an
    /// address that cannot be sent to, 410 Gone, out of attempts).
    pub dead_reason: Option<String>,
    /// When the last attempt was made.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When a 2xx was received.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// Which deliveries [`list_deliveries`] returns.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only to this endpoint.
    pub endpoint: Option<EndpointId>,
    /// Only of this event.
    pub event: Option<EventId>,
    /// Only those not delivered (pending, dead, cancelled, unknown).
    pub undelivered: bool,
    /// At most this many. Defaults to 100.
    pub limit: Option<i64>,
}

/// Deliveries, newest event first.
pub async fn list_deliveries<'e>(executor: impl PgExecutor<'e>, filter: &DeliveryFilter) -> Result<Vec<Delivery>> {
    let rows = crate::pooler::query(
        "SELECT d.endpoint_id, d.event_id, e.uid, d.job_id, d.attempts, d.last_status, d.last_error, d.dead_reason, \
                d.last_attempt_at, d.delivered_at, j.state AS job_state \
         FROM oncely.webhook_deliveries d JOIN oncely.events e ON e.id = d.event_id \
         LEFT JOIN oncely.jobs j ON j.id = d.job_id \
         WHERE ($1::bigint IS NULL OR d.endpoint_id = $1) AND ($2::bigint IS NULL OR d.event_id = $2) \
           AND (NOT $3 OR d.delivered_at IS NULL) \
         ORDER BY d.event_id DESC, d.endpoint_id LIMIT $4",
    )
    .bind(filter.endpoint)
    .bind(filter.event)
    .bind(filter.undelivered)
    .bind(filter.limit.unwrap_or(100))
    .fetch_all(executor)
    .await?;
    rows.iter()
        .map(|r| {
            let delivered_at: Option<DateTime<Utc>> = r.try_get("delivered_at")?;
            let job_state: Option<String> = r.try_get("job_state")?;
            let state = match (delivered_at, job_state.as_deref().map(str::parse::<JobState>).transpose()?) {
                (Some(_), _) => DeliveryState::Delivered,
                (None, Some(JobState::Available | JobState::Running)) => DeliveryState::Pending,
                (None, Some(JobState::Dead | JobState::Completed)) => DeliveryState::Dead,
                (None, Some(JobState::Cancelled)) => DeliveryState::Cancelled,
                (None, None) => DeliveryState::Unknown,
            };
            Ok(Delivery {
                endpoint_id: EndpointId(r.try_get("endpoint_id")?),
                event_id: EventId(r.try_get("event_id")?),
                message_id: message_id(r.try_get("uid")?),
                job_id: JobId(r.try_get("job_id")?),
                state,
                attempts: r.try_get("attempts")?,
                last_status: r.try_get("last_status")?,
                last_error: r.try_get("last_error")?,
                dead_reason: r.try_get("dead_reason")?,
                last_attempt_at: r.try_get("last_attempt_at")?,
                delivered_at,
            })
        })
        .collect()
}

/// Deliver an event to an endpoint again, by hand: a dead (or finished, or pruned) delivery gets a
/// new job with the same `webhook-id`, so a receiver that deduplicates still applies it once.
/// A delivery whose job is still live is left alone and that job is returned.
///
/// Refused with [`Error::EndpointDisabled`] while the endpoint is disabled: the new job would die
/// at once. Enable it first ([`enable_endpoint`](super::enable_endpoint)).
pub fn redeliver<'a, A>(db: A, endpoint: EndpointId, event: EventId) -> futures::future::BoxFuture<'a, Result<JobId>>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres> + Send + 'a,
{
    // A boxed `Send` future: an `async fn` generic over `Acquire` is not `Send` for a
    // `&mut PgConnection` argument (the bound is higher-ranked), which spawned tasks and
    // axum handlers need.
    Box::pin(async move {
        let result: Result<JobId> = async move {
            let mut tx = db.begin().await?;
            let row = crate::pooler::query(
                "SELECT d.job_id, j.state, j.queue, j.max_attempts, p.enabled, p.disabled_reason \
                 FROM oncely.webhook_deliveries d JOIN oncely.webhook_endpoints p ON p.id = d.endpoint_id \
                 LEFT JOIN oncely.jobs j ON j.id = d.job_id WHERE d.endpoint_id = $1 AND d.event_id = $2 FOR UPDATE OF d",
            )
            .bind(endpoint)
            .bind(event)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::NotFound { what: "webhook delivery of event", id: event.0 })?;
            let state = row.try_get::<Option<String>, _>("state")?.as_deref().map(str::parse::<JobState>).transpose()?;
            if state.is_some_and(|s| !s.is_finished()) {
                return Ok(JobId(row.try_get("job_id")?));
            }
            if !row.try_get::<bool, _>("enabled")? {
                let reason: Option<String> = row.try_get("disabled_reason")?;
                return Err(Error::EndpointDisabled { endpoint: endpoint.0, reason: reason.unwrap_or_default() });
            }
            let queue: String =
                row.try_get::<Option<String>, _>("queue")?.unwrap_or_else(|| outbox::DEFAULT_DELIVERY_QUEUE.into());
            let max_attempts: i32 = row.try_get::<Option<i32>, _>("max_attempts")?.unwrap_or(outbox::DEFAULT_DELIVERY_ATTEMPTS);
            let args = serde_json::json!({ "event_id": event, "endpoint_id": endpoint });
            let job = crate::job::NewJob::from_json(outbox::DELIVERY_KIND, args).queue(queue).max_attempts(max_attempts);
            let id = crate::queue::enqueue(&mut *tx, job).await?.id;
            crate::pooler::query(
                "UPDATE oncely.webhook_deliveries SET job_id = $3, delivered_at = NULL, dead_reason = NULL \
                 WHERE endpoint_id = $1 AND event_id = $2",
            )
            .bind(endpoint)
            .bind(event)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        }
        .await;
        result
    })
}

/// Which dead deliveries [`redeliver_dead`] sends again. Every field narrows the selection.
#[derive(Debug, Clone, Default)]
pub struct RedeliverFilter {
    /// Only to this endpoint.
    pub endpoint: Option<EndpointId>,
    /// Only events of this topic.
    pub topic: Option<String>,
    /// Only events published at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Only events published before this.
    pub until: Option<DateTime<Utc>>,
    /// At most this many. Defaults to 1000.
    pub limit: Option<i64>,
}

/// One delivery queued again by [`redeliver_dead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redelivered {
    /// The endpoint.
    pub endpoint_id: EndpointId,
    /// The event.
    pub event_id: EventId,
    /// The new delivery job.
    pub job_id: JobId,
}

/// Deliver again, in bulk, the undelivered deliveries whose job is dead (or pruned) and whose
/// endpoint is enabled, oldest event first, each as [`redeliver`] does (same `webhook-id`).
/// Deliveries to disabled endpoints are left alone: enable the endpoint first.
pub fn redeliver_dead<'a, A>(
    db: A,
    filter: &'a RedeliverFilter,
) -> futures::future::BoxFuture<'a, Result<Vec<Redelivered>>>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres> + Send + 'a,
{
    // A boxed `Send` future: an `async fn` generic over `Acquire` is not `Send` for a
    // `&mut PgConnection` argument (the bound is higher-ranked), which spawned tasks and
    // axum handlers need.
    Box::pin(async move {
        let result: Result<Vec<Redelivered>> = async move {
            if filter.limit.is_some_and(|l| l < 1) {
                return Err(Error::InvalidInput("limit must be at least 1".into()));
            }
            let mut conn = db.acquire().await?;
            let rows = crate::pooler::query(
                "SELECT d.endpoint_id, d.event_id FROM oncely.webhook_deliveries d \
                 JOIN oncely.events e ON e.id = d.event_id JOIN oncely.webhook_endpoints p ON p.id = d.endpoint_id \
                 LEFT JOIN oncely.jobs j ON j.id = d.job_id \
                 WHERE d.delivered_at IS NULL AND p.enabled AND (j.id IS NULL OR j.state = 'dead') \
                   AND ($1::bigint IS NULL OR d.endpoint_id = $1) AND ($2::text IS NULL OR e.topic = $2) \
                   AND ($3::timestamptz IS NULL OR e.created_at >= $3) AND ($4::timestamptz IS NULL OR e.created_at < $4) \
                 ORDER BY d.event_id, d.endpoint_id LIMIT $5",
            )
            .bind(filter.endpoint)
            .bind(&filter.topic)
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.limit.unwrap_or(1000))
            .fetch_all(&mut *conn)
            .await?;
            let mut done = Vec::with_capacity(rows.len());
            for row in rows {
                let (endpoint_id, event_id) = (EndpointId(row.try_get("endpoint_id")?), EventId(row.try_get("event_id")?));
                let job_id = redeliver(&mut *conn, endpoint_id, event_id).await?;
                done.push(Redelivered { endpoint_id, event_id, job_id });
            }
            Ok(done)
        }
        .await;
        result
    })
}

/// Everything a sender needs for one delivery attempt, read in one query.
#[derive(Debug, Clone)]
pub struct DeliveryTarget {
    /// The endpoint, as stored now.
    pub endpoint: Endpoint,
    /// The event.
    pub event: outbox::StoredEvent,
    /// The job that currently owns this delivery.
    pub job_id: JobId,
    /// Set on ordered endpoints.
    pub ordering_key: Option<String>,
    /// Attempts made so far.
    pub attempts: i32,
    /// Set once a 2xx was recorded.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// Load what an attempt to deliver `event` to `endpoint` needs.
pub async fn load_delivery<'e>(
    executor: impl PgExecutor<'e>,
    endpoint: EndpointId,
    event: EventId,
) -> Result<DeliveryTarget> {
    let sql = format!(
        "SELECT {ENDPOINT_COLUMNS}, d.job_id, d.ordering_key AS delivery_ordering_key, d.attempts, d.delivered_at, \
                {} \
         FROM oncely.webhook_deliveries d \
         JOIN oncely.webhook_endpoints p ON p.id = d.endpoint_id JOIN oncely.events e ON e.id = d.event_id \
         WHERE d.endpoint_id = $1 AND d.event_id = $2",
        outbox::EVENT_COLUMNS
    );
    let row = crate::pooler::query(&sql)
        .bind(endpoint)
        .bind(event)
        .fetch_optional(executor)
        .await?
        .ok_or(Error::NotFound { what: "webhook delivery of event", id: event.0 })?;
    Ok(DeliveryTarget {
        endpoint: endpoint_from_row(&row)?,
        event: outbox::event_from_row(&row)?,
        job_id: JobId(row.try_get("job_id")?),
        ordering_key: row.try_get("delivery_ordering_key")?,
        attempts: row.try_get("attempts")?,
        delivered_at: row.try_get("delivered_at")?,
    })
}

/// While an earlier event with the same ordering key has not been delivered to this endpoint and
/// its job is still live, how long until the latest such job is due (zero when it is due or
/// running): an ordered delivery waits at least that long. `None` when nothing blocks it (a dead
/// predecessor no longer does).
pub async fn delivery_live_predecessor<'e>(
    executor: impl PgExecutor<'e>,
    endpoint: EndpointId,
    ordering_key: &str,
    event: EventId,
) -> Result<Option<Duration>> {
    let due_in: Option<f64> = crate::pooler::query_scalar(
        "SELECT max(greatest(extract(epoch FROM j.run_at - now()), 0))::float8 \
         FROM oncely.webhook_deliveries d JOIN oncely.jobs j ON j.id = d.job_id \
         WHERE d.endpoint_id = $1 AND d.ordering_key = $2 AND d.event_id < $3 AND d.delivered_at IS NULL \
           AND j.state IN ('available', 'running')",
    )
    .bind(endpoint)
    .bind(ordering_key)
    .bind(event)
    .fetch_one(executor)
    .await?;
    Ok(due_in.map(Duration::from_secs_f64))
}

/// The result of one delivery attempt, to record.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The HTTP status, when an answer came.
    pub status: Option<i32>,
    /// What went wrong, when it did.
    pub error: Option<String>,
    /// True for a 2xx.
    pub delivered: bool,
}

/// What recording an attempt found.
#[derive(Debug, Clone, Copy)]
pub struct AttemptRecorded {
    /// Attempts made, this one included.
    pub attempts: i32,
    /// How long the endpoint has been failing without a success in between (database clock); zero
    /// after a success.
    pub failing_for: Duration,
}

/// The statement of [`record_delivery_attempt`]: `$1` endpoint, `$2` event, `$3` status, `$4` error,
/// `$5` delivered, `$6` and `$7` the delivery job's claim (id, attempt).
pub(crate) const DELIVERY_RECORD_ATTEMPT: &str = concat!(
    r#"
WITH fence AS (
    -- The claim must still hold the job; FOR SHARE re-reads the newest row version and keeps a
    -- rescue from changing it until this statement's transaction ends.
    SELECT id FROM oncely.jobs WHERE id = $6 AND attempt = $7 AND state = 'running' FOR SHARE
), d AS (
    UPDATE oncely.webhook_deliveries
    SET attempts = attempts + 1, last_status = $3, last_error = $4, last_attempt_at = now(),
        delivered_at = CASE WHEN $5 THEN now() ELSE delivered_at END
    WHERE endpoint_id = $1 AND event_id = $2 AND job_id = $6 AND EXISTS (SELECT 1 FROM fence)
    RETURNING attempts, ordering_key
), flip AS (
    -- Only a change of the failure run writes the endpoint row: concurrent deliveries to one
    -- endpoint would otherwise queue for its row lock, each through its commit.
    UPDATE oncely.webhook_endpoints
    SET failing_since = CASE WHEN $5 THEN NULL ELSE now() END
    WHERE id = $1 AND (failing_since IS NULL) <> $5 AND EXISTS (SELECT 1 FROM d)
), p AS (
    -- The snapshot before `flip`: NULL when this failure starts the run.
    SELECT CASE WHEN $5 THEN 0 ELSE coalesce(extract(epoch FROM now() - failing_since), 0) END::float8 AS failing_for
    FROM oncely.webhook_endpoints WHERE id = $1
), wake AS (
    UPDATE oncely.jobs SET run_at = now()
    WHERE $5 AND state = 'available' AND id = (
        SELECT n.job_id FROM oncely.webhook_deliveries n, d
        WHERE n.endpoint_id = $1 AND n.ordering_key = d.ordering_key AND n.event_id > $2 AND n.delivered_at IS NULL
        ORDER BY n.event_id LIMIT 1)
    RETURNING pg_notify("#,
    jobs_channel!(),
    r#", queue)
)
-- `wake` is read so that its RETURNING (the NOTIFY) is evaluated for every woken row. One row
-- always: `attempts` is NULL when the fence refused the write.
SELECT (SELECT attempts FROM d) AS attempts, (SELECT failing_for FROM p) AS failing_for,
       (SELECT count(*) FROM wake) AS woken,
       EXISTS (SELECT 1 FROM oncely.webhook_deliveries WHERE endpoint_id = $1 AND event_id = $2) AS found
"#
);

/// Record one attempt: the delivery's counters, and the endpoint's failure run (cleared by a
/// success, started by the first failure). A success on an ordered endpoint also wakes the next
/// waiting delivery of the same ordering key.
///
/// Fenced by the delivery job's `claim`: the write happens only while that claim still holds the
/// job (`id`, `attempt`, `state = 'running'`) and the delivery still belongs to that job. A worker
/// whose lease was lost — its job rescued and claimed again, cancelled, or superseded by a
/// redelivery — gets [`Error::LeaseLost`] and changes nothing, so it cannot overwrite the record of
/// a newer attempt.
pub async fn record_delivery_attempt<'e>(
    executor: impl PgExecutor<'e>,
    claim: Claim,
    endpoint: EndpointId,
    event: EventId,
    attempt: &AttemptRecord,
) -> Result<AttemptRecorded> {
    let row = crate::pooler::query(DELIVERY_RECORD_ATTEMPT)
        .bind(endpoint)
        .bind(event)
        .bind(attempt.status)
        .bind(&attempt.error)
        .bind(attempt.delivered)
        .bind(claim.id)
        .bind(claim.attempt)
        .fetch_one(executor)
        .await?;
    let Some(attempts) = row.try_get::<Option<i32>, _>("attempts")? else {
        return Err(if row.try_get("found")? {
            Error::LeaseLost { job_id: claim.id, attempt: claim.attempt }
        } else {
            Error::NotFound { what: "webhook delivery of event", id: event.0 }
        });
    };
    let failing_for: f64 = row.try_get::<Option<f64>, _>("failing_for")?.unwrap_or(0.0);
    Ok(AttemptRecorded { attempts, failing_for: Duration::from_secs_f64(failing_for.max(0.0)) })
}
