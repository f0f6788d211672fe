//! The transactional outbox: publish an event inside your business transaction.
//!
//! [`publish`] writes the event and, in the same statement, one delivery row and one delivery job
//! per enabled webhook endpoint subscribed to its topic. So the event and its deliveries exist if
//! and only if the caller's transaction commits, and nothing ever polls the events table by
//! "id greater than the last one seen" — which would skip an event whose transaction took a lower
//! id but committed after a higher one. Delivery jobs run on the ordinary queue (leases, fenced
//! writes, rescue, dead letter); the `oncely-webhooks` crate has their handler.
//!
//! Events that share an ordering key are numbered in commit order: publish holds a transaction-level
//! advisory lock on the key until the caller commits, so two transactions publishing under one key
//! are serialized (and only those). Endpoints created with `ordered` receive such events one at a
//! time, in that order.
//!
//! The same statement starts one run per function subscribed to the topic (see
//! [`function`](crate::function)): a job of the function's kind carrying the event. Runs, like
//! deliveries, exist if and only if the publishing transaction commits.
//!
//! An event may carry an idempotency [`key`](Event::key): a second publish with a live key (24 hours
//! by default) stores nothing and answers with the first event, marked
//! [`duplicate`](Published::duplicate).
//!
//! What is *not* promised: an endpoint created, or a function subscribed, after an event was
//! published does not receive it. Subscriptions are not retroactive: events published while no
//! worker had stored a function's subscription start no run of it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, Row};
use tracing::instrument;

use crate::error::{Error, Result};

/// The job kind of webhook deliveries (one job per endpoint and event).
pub const DELIVERY_KIND: &str = "oncely.webhook_delivery";
/// Defaults to `"webhooks"`: the queue delivery jobs go to.
pub const DEFAULT_DELIVERY_QUEUE: &str = "webhooks";
/// Defaults to 8: delivery attempts per endpoint before a delivery goes to the dead letter (with the
/// default schedule of `oncely-webhooks`, about 28 hours of retries).
pub const DEFAULT_DELIVERY_ATTEMPTS: i32 = 8;
/// Topics under this prefix are operational: an endpoint subscribed to `*` does not receive them;
/// only endpoints that name them do.
pub const OPERATIONAL_TOPIC_PREFIX: &str = "oncely.";
/// The topic of the operational event published when an endpoint is disabled.
pub const ENDPOINT_DISABLED_TOPIC: &str = "oncely.endpoint.disabled";
/// The longest topic or ordering key, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;

/// An event's id (the `oncely.events.id` column).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize, sqlx::Type,
)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct EventId(pub i64);

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An event to publish.
///
/// # Example
///
/// ```
/// use oncely_core::outbox::Event;
/// let event = Event::new("invoice.paid", &serde_json::json!({ "invoice": "in_123" }))?
///     .ordering_key("customer:42");
/// # Ok::<(), oncely_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub(crate) topic: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) ordering_key: Option<String>,
    pub(crate) queue: String,
    pub(crate) max_attempts: i32,
    pub(crate) key: Option<String>,
    pub(crate) key_window: Duration,
}

/// Defaults to 24 hours (Inngest's event id window): how long an event's idempotency key makes a
/// later publish with the same key a no-op.
pub const DEFAULT_EVENT_KEY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The longest event idempotency key, in bytes.
pub const MAX_EVENT_KEY_LEN: usize = 1024;

impl Event {
    /// An event on `topic` with `payload` serialized to JSON.
    pub fn new(topic: impl Into<String>, payload: &impl Serialize) -> Result<Self> {
        let topic = topic.into();
        let payload = serde_json::to_value(payload)
            .map_err(|source| Error::InvalidArgs { kind: format!("event {topic}"), source })?;
        Ok(Self::from_json(topic, payload))
    }

    /// An event from raw JSON.
    pub fn from_json(topic: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            topic: topic.into(),
            payload,
            ordering_key: None,
            queue: DEFAULT_DELIVERY_QUEUE.to_owned(),
            max_attempts: DEFAULT_DELIVERY_ATTEMPTS,
            key: None,
            key_window: DEFAULT_EVENT_KEY_WINDOW,
        }
    }

    /// An idempotency key (seed 002's event key, Inngest's event `id`): a later publish with the
    /// same key, while the first one's key is live ([`key_window`](Self::key_window)), stores
    /// nothing, fans out nothing, and returns the first event with [`Published::duplicate`] set.
    /// Concurrent publishers with one key are serialized on it: exactly one stores the event (if its
    /// transaction rolls back, the next one does).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// How long the [`key`](Self::key) deduplicates. Defaults to [`DEFAULT_EVENT_KEY_WINDOW`].
    pub fn key_window(mut self, window: Duration) -> Self {
        self.key_window = window;
        self
    }

    /// Events with the same ordering key reach ordered endpoints one at a time, in commit order.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// The queue of this event's delivery jobs. Defaults to [`DEFAULT_DELIVERY_QUEUE`].
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Delivery attempts per endpoint. Defaults to [`DEFAULT_DELIVERY_ATTEMPTS`].
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    fn validate(&self) -> Result<()> {
        validate_topic(&self.topic)?;
        if let Some(key) = &self.ordering_key {
            crate::job::check_len("ordering key", key, MAX_TOPIC_LEN)?;
        }
        if let Some(key) = &self.key {
            crate::job::check_len("event key", key, MAX_EVENT_KEY_LEN)?;
        }
        if self.key_window.is_zero() {
            return Err(Error::InvalidInput("event key window must be positive".into()));
        }
        crate::job::check_delivery(&self.queue, self.max_attempts)
    }
}

/// A topic is 1 to 255 bytes of printable ASCII without spaces (`*` alone means "every topic" in
/// an endpoint's subscription and cannot be published).
pub(crate) fn validate_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN || !topic.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidInput(format!(
            "topic must be 1..={MAX_TOPIC_LEN} printable ASCII characters without spaces, got {topic:?}"
        )));
    }
    Ok(())
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's id.
    pub id: EventId,
    /// Its Standard Webhooks message id (`webhook-id`), the same on every delivery attempt.
    pub message_id: String,
    /// How many endpoints it will be delivered to (0 for a duplicate).
    pub deliveries: i64,
    /// How many function runs it started (0 for a duplicate).
    pub runs: i64,
    /// True when its [`key`](Event::key) was already used by a live event: nothing was stored, and
    /// `id` and `message_id` are the earlier event's.
    pub duplicate: bool,
}

/// The `webhook-id` of an event: `msg_` and its uuid in hex.
pub fn message_id(uid: uuid::Uuid) -> String {
    format!("msg_{}", uid.simple())
}

/// Insert a batch of events, one delivery job and one delivery row per (event, subscribed
/// endpoint), and one function run per (event, matching function subscription), in one statement.
/// Events whose idempotency key is held by a live earlier event are not stored: their row answers
/// with the earlier event (`duplicate`). Returns one row per input event, in input order.
pub(crate) const EVENT_PUBLISH_MANY: &str = concat!(
    r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::text[], $5::int[], $8::text[], $9::float8[])
        WITH ORDINALITY AS t(topic, payload, ordering_key, queue, max_attempts, event_key, key_window, ord)
), lock AS (
    -- A transaction lock per ordering key, taken in key order so that two batches never wait for
    -- each other crosswise. Held until the caller commits: events of one key are numbered in
    -- commit order.
    SELECT count(pg_advisory_xact_lock(hashtextextended('oncely.events/' || k, 0))) AS locked
    FROM (SELECT DISTINCT ordering_key AS k FROM input WHERE ordering_key IS NOT NULL ORDER BY 1) AS keys
), drawn AS (
    -- Ids are drawn after the locks, in input order (referenced twice, so computed once per row).
    SELECT i.*, nextval(pg_get_serial_sequence('oncely.events', 'id')) AS new_id, gen_random_uuid() AS new_uid
    FROM input i CROSS JOIN lock
), claims AS (
    -- One claim per distinct key (its first occurrence in the batch). DO UPDATE, not DO NOTHING:
    -- it waits for a concurrent publisher of the key, then locks and returns the row it committed
    -- even though this statement's snapshot cannot see it. A live key keeps its event (this one is
    -- a duplicate); an expired one is taken over.
    INSERT INTO oncely.event_keys AS k (key, event_id, event_uid, expires_at)
    SELECT DISTINCT ON (event_key) event_key, new_id, new_uid, now() + make_interval(secs => key_window)
    FROM drawn WHERE event_key IS NOT NULL ORDER BY event_key, ord
    ON CONFLICT (key) DO UPDATE SET
        event_id   = CASE WHEN k.expires_at <= now() THEN EXCLUDED.event_id ELSE k.event_id END,
        event_uid  = CASE WHEN k.expires_at <= now() THEN EXCLUDED.event_uid ELSE k.event_uid END,
        created_at = CASE WHEN k.expires_at <= now() THEN now() ELSE k.created_at END,
        expires_at = CASE WHEN k.expires_at <= now() THEN EXCLUDED.expires_at ELSE k.expires_at END
    RETURNING key, event_id, event_uid
), resolved AS (
    SELECT d.*, coalesce(c.event_id, d.new_id) AS id, coalesce(c.event_uid, d.new_uid) AS uid,
           coalesce(c.event_id <> d.new_id, false) AS duplicate
    FROM drawn d LEFT JOIN claims c ON c.key = d.event_key
), fresh AS (
    SELECT * FROM resolved WHERE NOT duplicate
), ev AS (
    INSERT INTO oncely.events (id, uid, topic, payload, ordering_key) OVERRIDING SYSTEM VALUE
    SELECT id, uid, topic, payload, ordering_key FROM fresh ORDER BY ord
    RETURNING id
), targets AS (
    SELECT f.id AS event_id, f.ordering_key, f.queue, f.max_attempts, p.id AS endpoint_id, p.ordered
    FROM fresh f
    -- '*' receives every topic except the operational ones under 'oncely.', which can name other
    -- endpoints (and so other tenants): those go only to endpoints that subscribe to them by name.
    JOIN oncely.webhook_endpoints p
      ON p.enabled AND p.topics && ARRAY[f.topic::text, CASE WHEN starts_with(f.topic, $7) THEN NULL ELSE '*' END]
), jobs AS (
    INSERT INTO oncely.jobs (kind, queue, args, max_attempts)
    SELECT $6, queue, jsonb_build_object('event_id', event_id, 'endpoint_id', endpoint_id), max_attempts
    FROM targets
    RETURNING id, (args->>'event_id')::bigint AS event_id, (args->>'endpoint_id')::bigint AS endpoint_id,
              pg_notify("#,
    jobs_channel!(),
    r#", queue) IS NULL AS notified
), deliveries AS (
    INSERT INTO oncely.webhook_deliveries (endpoint_id, event_id, ordering_key, job_id)
    SELECT t.endpoint_id, t.event_id, CASE WHEN t.ordered THEN t.ordering_key END, jobs.id
    FROM jobs JOIN targets t ON t.event_id = jobs.event_id AND t.endpoint_id = jobs.endpoint_id
    RETURNING event_id
), counts AS (
    SELECT event_id, count(*) AS n FROM deliveries GROUP BY event_id
), runs AS (
    -- One run per matching function subscription: a job of the function's kind carrying the event.
    -- Prefix patterns follow the endpoints' rule: 'oncely.' topics only reach patterns naming them.
    INSERT INTO oncely.jobs (kind, queue, args, max_attempts)
    SELECT s.function, s.queue,
           jsonb_build_object('trigger', jsonb_build_object('event', jsonb_build_object(
               'id', f.id, 'topic', f.topic, 'payload', f.payload, 'key', f.event_key,
               'ordering_key', f.ordering_key, 'published_at', now()))),
           s.max_attempts
    FROM fresh f
    JOIN oncely.function_subscriptions s
      ON (s.topic = f.topic
          OR (starts_with(f.topic, s.topic_prefix) AND (NOT starts_with(f.topic, $7) OR starts_with(s.topic_prefix, $7))))
     AND (s.filter IS NULL OR f.payload @> s.filter)
    RETURNING (args #>> '{trigger,event,id}')::bigint AS event_id, pg_notify("#,
    jobs_channel!(),
    r#", queue) IS NULL AS notified
), run_counts AS (
    SELECT event_id, count(*) AS n FROM runs GROUP BY event_id
), waits AS (
    -- Waiting runs (wait_for_event, cancel_on) matched by these events: resolved and woken or
    -- cancelled by a volatile function whose lookups see what committed before its locks
    -- (migrations/20261202000100_event_waits.sql). Without any wait on these topics it takes one
    -- shared lock per topic and one index lookup.
    SELECT oncely.resolve_event_waits(array_agg(id), array_agg(topic::text), array_agg(payload)) AS matched FROM fresh
)
SELECT r.id, r.uid, r.duplicate, coalesce(c.n, 0) AS deliveries, coalesce(rc.n, 0) AS runs
FROM resolved r CROSS JOIN waits
LEFT JOIN counts c ON c.event_id = r.id AND NOT r.duplicate
LEFT JOIN run_counts rc ON rc.event_id = r.id AND NOT r.duplicate
ORDER BY r.ord
"#
);

/// Publish an event: inside the caller's transaction, so that it exists (and is delivered) if and
/// only if that transaction commits. One statement.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// use oncely_core::outbox::{publish, Event};
///
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE invoices SET paid = true WHERE id = $1").bind(123_i64).execute(&mut *tx).await?;
/// publish(&mut *tx, &Event::new("invoice.paid", &serde_json::json!({ "invoice": 123 }))?).await?;
/// tx.commit().await?; // no commit, no event
/// # Ok(()) }
/// ```
#[instrument(skip_all, fields(topic = %event.topic), err)]
pub async fn publish<'e>(executor: impl PgExecutor<'e>, event: &Event) -> Result<Published> {
    let mut published = publish_many(executor, std::slice::from_ref(event)).await?;
    published.pop().ok_or_else(|| Error::InvalidInput("publish: the statement returned no event".into()))
}

/// Publish many events in one statement (a backfill, or several events of one business change), in
/// input order: ids, and so the order of events sharing an ordering key, follow the slice. Like
/// [`publish`], pass your transaction to make them commit with your writes.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// use oncely_core::outbox::{publish_many, Event};
/// let events: Vec<Event> = (1..=3)
///     .map(|n| Event::from_json("invoice.paid", serde_json::json!({ "invoice": n })).ordering_key("customer:42"))
///     .collect();
/// let published = publish_many(&pool, &events).await?;
/// assert_eq!(published.len(), 3);
/// # Ok(()) }
/// ```
#[instrument(skip_all, fields(count = events.len()), err)]
pub async fn publish_many<'e>(executor: impl PgExecutor<'e>, events: &[Event]) -> Result<Vec<Published>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    for event in events {
        event.validate()?;
    }
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let keys: Vec<Option<&str>> = events.iter().map(|e| e.ordering_key.as_deref()).collect();
    let queues: Vec<&str> = events.iter().map(|e| e.queue.as_str()).collect();
    let max_attempts: Vec<i32> = events.iter().map(|e| e.max_attempts).collect();
    let event_keys: Vec<Option<&str>> = events.iter().map(|e| e.key.as_deref()).collect();
    let windows: Vec<f64> = events.iter().map(|e| e.key_window.as_secs_f64()).collect();
    let rows = crate::pooler::query(EVENT_PUBLISH_MANY)
        .bind(&topics)
        .bind(&payloads)
        .bind(&keys)
        .bind(&queues)
        .bind(&max_attempts)
        .bind(DELIVERY_KIND)
        .bind(OPERATIONAL_TOPIC_PREFIX)
        .bind(&event_keys)
        .bind(&windows)
        .fetch_all(executor)
        .await?;
    if rows.len() != events.len() {
        return Err(Error::InvalidInput(format!("publish_many: stored {} events of {}", rows.len(), events.len())));
    }
    rows.iter()
        .map(|row| {
            Ok(Published {
                id: EventId(row.try_get("id")?),
                message_id: message_id(row.try_get("uid")?),
                deliveries: row.try_get("deliveries")?,
                runs: row.try_get("runs")?,
                duplicate: row.try_get("duplicate")?,
            })
        })
        .collect()
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Its id.
    pub id: EventId,
    /// Its `webhook-id`.
    pub message_id: String,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: serde_json::Value,
    /// The ordering key.
    pub ordering_key: Option<String>,
    /// When it was published (database clock).
    pub created_at: DateTime<Utc>,
}

/// An event's columns in `SELECT` lists of queries that join other tables (`e` is the events
/// table); [`event_from_row`] reads them.
pub(crate) const EVENT_COLUMNS: &str =
    "e.id AS event_id, e.uid AS event_uid, e.topic AS event_topic, e.payload AS event_payload, \
     e.ordering_key AS event_ordering_key, e.created_at AS event_created_at";

/// Read an event selected with [`EVENT_COLUMNS`].
pub(crate) fn event_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredEvent> {
    Ok(StoredEvent {
        id: EventId(row.try_get("event_id")?),
        message_id: message_id(row.try_get("event_uid")?),
        topic: row.try_get("event_topic")?,
        payload: row.try_get("event_payload")?,
        ordering_key: row.try_get("event_ordering_key")?,
        created_at: row.try_get("event_created_at")?,
    })
}

/// Fetch one event.
pub async fn get_event<'e>(executor: impl PgExecutor<'e>, id: EventId) -> Result<StoredEvent> {
    let row = crate::pooler::query(&format!("SELECT {EVENT_COLUMNS} FROM oncely.events e WHERE e.id = $1"))
        .bind(id)
        .fetch_optional(executor)
        .await?
        .ok_or(Error::NotFound { what: "event", id: id.0 })?;
    event_from_row(&row)
}

/// Delete up to `limit` events published longer ago than `older_than` that nothing needs any more:
/// every delivery of theirs was delivered, or its job is gone (dead jobs are kept for their own
/// retention, so a dead delivery stays redeliverable until then). Their delivery rows go with them.
/// Returns how many were deleted.
pub async fn prune_events<'e>(
    executor: impl PgExecutor<'e>,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<u64> {
    let res = crate::pooler::query(
        "DELETE FROM oncely.events WHERE id IN ( \
             SELECT e.id FROM oncely.events e \
             WHERE e.created_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM oncely.webhook_deliveries d JOIN oncely.jobs j ON j.id = d.job_id \
                               WHERE d.event_id = e.id AND d.delivered_at IS NULL) \
             LIMIT $2)",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .execute(executor)
    .await?;
    Ok(res.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_events_are_refused_before_the_database() {
        let ok = Event::from_json("invoice.paid", serde_json::json!({}));
        assert!(ok.validate().is_ok());
        for topic in ["", "has space", "tab\t", &"x".repeat(256)] {
            assert!(Event::from_json(topic, serde_json::json!({})).validate().is_err(), "{topic:?}");
        }
        assert!(ok.clone().ordering_key("").validate().is_err());
        assert!(ok.clone().max_attempts(0).validate().is_err());
        assert!(ok.queue("").validate().is_err());
    }

    #[test]
    fn message_ids_are_the_uuid_in_hex() {
        let uid = uuid::Uuid::parse_str("0b6e5f1c-2a4f-4f59-9a39-0f8f6a1d2c3e").unwrap();
        assert_eq!(message_id(uid), "msg_0b6e5f1c2a4f4f599a390f8f6a1d2c3e");
    }
}
