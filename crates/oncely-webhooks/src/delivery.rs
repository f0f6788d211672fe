//! The delivery handler: one job per (endpoint, event), run by the ordinary worker.
//!
//! Each attempt loads the delivery, checks the endpoint is enabled (and, on an ordered endpoint,
//! that no earlier event of the same ordering key is still waiting), signs the body with a fresh
//! timestamp, POSTs it, records the result, and tells the worker what to do next:
//!
//! | answer | what happens |
//! |---|---|
//! | 2xx | delivered |
//! | 410 Gone | the endpoint is disabled (an operational event is published); the delivery fails |
//! | 429, 502, 503, 504 with `Retry-After` | retried after that long (capped), or after the schedule's delay when that is longer |
//! | anything else, a timeout, a refused connection | retried on the [`RetrySchedule`] |
//! | failures for longer than `disable_after`, none succeeding | the endpoint is disabled |
//!
//! Delivery is at least once — a worker killed after the endpoint answered and before the answer
//! was recorded sends again — and every attempt of one event carries the same `webhook-id`, which
//! is what receivers deduplicate on. Two workers never send the same delivery at the same time
//! while both hold the database: the job's lease (heartbeated, longer than the request timeout)
//! belongs to one of them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use oncely_core::outbox::{EventId, StoredEvent, DELIVERY_KIND};
use oncely_core::webhook::{self, AttemptRecord, EndpointId};
use oncely_core::JobArgs;
use oncely_worker::{Handler, HandlerResult, JobContext, Outcome};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::signature::{signature_header, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use crate::transport::{HttpTransport, Transport, WebhookRequest, WebhookResponse};

/// Defaults to 15 s: the time limit of one attempt (keep it well under the worker's lease).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Defaults to 24 hours: the longest `Retry-After` honoured.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Defaults to 5 days: an endpoint failing this long without a success is disabled.
pub const DEFAULT_DISABLE_AFTER: Duration = Duration::from_secs(5 * 24 * 3600);
/// Defaults to 10 s: how often, at least, an ordered delivery checks again whether its
/// predecessor is done (it waits until the predecessor's next attempt when that is later; a
/// delivered predecessor also wakes it at once).
pub const DEFAULT_ORDERED_WAIT: Duration = Duration::from_secs(10);

/// The arguments of a delivery job (published by [`oncely_core::outbox::publish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverWebhook {
    /// The event.
    pub event_id: EventId,
    /// The endpoint.
    pub endpoint_id: EndpointId,
}

impl JobArgs for DeliverWebhook {
    const KIND: &'static str = DELIVERY_KIND;
}

/// Delays between failed attempts: entry `n - 1` after failed attempt `n` (the last entry repeats),
/// each scaled down by up to `jitter` so endpoints that fail together do not retry together.
///
/// The default — 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h — spreads the default 8 attempts over
/// about 28 hours.
///
/// # Example
///
/// ```
/// use oncely_webhooks::RetrySchedule;
/// use std::time::Duration;
/// let s = RetrySchedule::default();
/// assert_eq!(s.delay_with(1, 0.0), Duration::from_secs(5));
/// assert_eq!(s.delay_with(20, 0.0), Duration::from_secs(36_000));
/// assert!(s.delay_with(2, 0.99) < Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    /// The delays; must not be empty.
    pub delays: Vec<Duration>,
    /// The fraction of a delay that jitter may remove, in `[0, 1]`.
    pub jitter: f64,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        let m = 60;
        let h = 3600;
        RetrySchedule {
            delays: [5, 5 * m, 30 * m, 2 * h, 5 * h, 10 * h, 10 * h].into_iter().map(Duration::from_secs).collect(),
            jitter: 0.2,
        }
    }
}

impl RetrySchedule {
    /// The delay after failed attempt `attempt` (1-based), jittered from the thread RNG.
    pub fn delay(&self, attempt: i32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// The delay after failed attempt `attempt`, scaled by `1 - jitter * unit` (`unit` in `[0, 1)`).
    pub fn delay_with(&self, attempt: i32, unit: f64) -> Duration {
        let i = (attempt.max(1) as usize - 1).min(self.delays.len().saturating_sub(1));
        let base = self.delays.get(i).copied().unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        base.mul_f64(1.0 - self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0))
    }
}

/// Settings of [`WebhookDelivery`].
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Time limit of one attempt. Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// Delays between failed attempts. Defaults to [`RetrySchedule::default`].
    pub schedule: RetrySchedule,
    /// The longest `Retry-After` honoured. Defaults to [`DEFAULT_MAX_RETRY_AFTER`].
    pub max_retry_after: Duration,
    /// Disable an endpoint after failing this long. Defaults to [`DEFAULT_DISABLE_AFTER`].
    pub disable_after: Duration,
    /// Recheck interval of a waiting ordered delivery. Defaults to [`DEFAULT_ORDERED_WAIT`].
    pub ordered_wait: Duration,
    /// The `user-agent` header. Defaults to `oncely-webhooks/<version>`.
    pub user_agent: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            schedule: RetrySchedule::default(),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            disable_after: DEFAULT_DISABLE_AFTER,
            ordered_wait: DEFAULT_ORDERED_WAIT,
            user_agent: concat!("oncely-webhooks/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// The handler of delivery jobs. Register it on a worker that serves the delivery queue.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use oncely_webhooks::{DeliveryConfig, WebhookDelivery};
/// let worker = oncely_worker::Worker::builder(pool)
///     .register(WebhookDelivery::new(DeliveryConfig::default()))
///     .queue(oncely_core::outbox::DEFAULT_DELIVERY_QUEUE, 32)
///     .build()?
///     .start();
/// # worker.shutdown().await; Ok(()) }
/// ```
pub struct WebhookDelivery<T = HttpTransport> {
    config: DeliveryConfig,
    transport: Arc<T>,
}

impl<T> std::fmt::Debug for WebhookDelivery<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookDelivery")
            .field("config", &self.config)
            .field("transport", &std::any::type_name::<T>())
            .finish()
    }
}

impl WebhookDelivery<HttpTransport> {
    /// Deliver over HTTP and HTTPS with [`HttpTransport::new`] (public addresses, web roots).
    pub fn new(config: DeliveryConfig) -> Self {
        Self::with_transport(config, HttpTransport::new())
    }
}

impl<T: Transport> WebhookDelivery<T> {
    /// Deliver through `transport` (e.g. one with TLS).
    pub fn with_transport(config: DeliveryConfig, transport: T) -> Self {
        WebhookDelivery { config, transport: Arc::new(transport) }
    }
}

/// The body sent for an event: `{"data": payload, "timestamp": published at, "type": topic}`
/// (Standard Webhooks' envelope). The same bytes on every attempt.
pub fn event_body(event: &StoredEvent) -> Bytes {
    let body = serde_json::json!({
        "type": event.topic,
        "timestamp": event.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "data": event.payload,
    });
    Bytes::from(serde_json::to_vec(&body).expect("a JSON value serializes"))
}

/// Parse `Retry-After`: delay seconds, or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Statuses whose `Retry-After` is honoured.
fn honours_retry_after(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

#[async_trait]
impl<T: Transport> Handler<DeliverWebhook> for WebhookDelivery<T> {
    async fn handle(&self, ctx: JobContext, args: DeliverWebhook) -> HandlerResult {
        let span = tracing::info_span!("webhook_delivery", endpoint.id = %args.endpoint_id, event.id = %args.event_id);
        self.deliver(ctx, args).instrument(span).await
    }

    fn timeout(&self) -> Option<Duration> {
        // The request plus 5 s for the database work around it: 20 s by default, under the
        // default 30 s lease, so a worker cut off from the database stops before a rescue.
        Some(self.config.request_timeout + Duration::from_secs(5))
    }
}

impl<T: Transport> WebhookDelivery<T> {
    async fn deliver(&self, ctx: JobContext, args: DeliverWebhook) -> HandlerResult {
        let pool = ctx.pool();
        let target = match webhook::load_delivery(pool, args.endpoint_id, args.event_id).await {
            Err(oncely_core::Error::NotFound { .. }) => {
                return Err(Outcome::fail("the delivery, its event or its endpoint no longer exists"))
            }
            other => other?,
        };
        if target.job_id != ctx.id() {
            return Err(Outcome::cancel(format!("superseded by job {} (redelivered)", target.job_id)));
        }
        if target.delivered_at.is_some() {
            // An earlier attempt of this job got a 2xx; only its completion was lost.
            return Ok(());
        }
        let endpoint = &target.endpoint;
        let claim = ctx.claim();
        if !endpoint.enabled {
            let reason = format!(
                "endpoint {} is disabled: {}",
                endpoint.id,
                endpoint.disabled_reason.as_deref().unwrap_or("disabled")
            );
            webhook::set_dead_reason(pool, claim, endpoint.id, args.event_id, &reason).await?;
            return Err(Outcome::fail(reason));
        }
        if let Some(key) = &target.ordering_key {
            if let Some(due_in) = webhook::delivery_live_predecessor(pool, endpoint.id, key, args.event_id).await? {
                // Sleep past the predecessor's next attempt: a long retry of the head of a key
                // must not make every event queued behind it poll. Its success wakes us earlier.
                return Err(Outcome::snooze(due_in.max(self.config.ordered_wait)));
            }
        }
        if ctx.is_cancelled() {
            return Err(Outcome::retry("lease lost before sending"));
        }

        let body = event_body(&target.event);
        let timestamp = Utc::now().timestamp();
        let msg_id = &target.event.message_id;
        let request = WebhookRequest {
            url: endpoint.url.clone(),
            headers: vec![
                ("content-type", "application/json".to_owned()),
                ("user-agent", self.config.user_agent.clone()),
                (HEADER_ID, msg_id.clone()),
                (HEADER_TIMESTAMP, timestamp.to_string()),
                (HEADER_SIGNATURE, signature_header(&endpoint.signing_secrets(), msg_id, timestamp, &body)),
            ],
            body,
            timeout: self.config.request_timeout,
        };
        let result = self.transport.send(request).await;
        let record = match &result {
            Ok(r) => {
                let delivered = (200..300).contains(&r.status);
                AttemptRecord {
                    status: Some(i32::from(r.status)),
                    delivered,
                    error: (!delivered).then(|| format!("HTTP {}: {}", r.status, r.body_excerpt)),
                }
            }
            Err(e) => AttemptRecord { status: None, delivered: false, error: Some(e.to_string()) },
        };
        // Fenced by this attempt's claim: a worker that lost its lease records nothing.
        let recorded = webhook::record_delivery_attempt(pool, claim, endpoint.id, args.event_id, &record).await?;
        tracing::debug!(status = ?record.status, attempts = recorded.attempts, "webhook attempt");
        let class = match record.status {
            Some(s) => format!("{}xx", s / 100),
            None => "error".to_owned(),
        };
        metrics::counter!("oncely_webhook_deliveries_total", "status_class" => class).increment(1);

        match result {
            Ok(_) if record.delivered => Ok(()),
            Ok(WebhookResponse { status: 410, .. }) => {
                let reason = "the endpoint answered 410 Gone";
                webhook::disable_endpoint_for_delivery(pool, claim, endpoint.id, args.event_id, reason).await?;
                metrics::counter!("oncely_webhook_endpoint_disables_total").increment(1);
                Err(Outcome::fail("410 Gone: endpoint disabled"))
            }
            Err(e) if e.is_permanent() => {
                webhook::set_dead_reason(pool, claim, endpoint.id, args.event_id, &e.to_string()).await?;
                Err(Outcome::fail(e))
            }
            other => {
                let error = record.error.unwrap_or_default();
                if recorded.failing_for >= self.config.disable_after {
                    let reason = format!("failing for {}s without a success", recorded.failing_for.as_secs());
                    webhook::disable_endpoint_for_delivery(pool, claim, endpoint.id, args.event_id, &reason).await?;
                    metrics::counter!("oncely_webhook_endpoint_disables_total").increment(1);
                    return Err(Outcome::fail(format!("{error}; endpoint disabled: {reason}")));
                }
                if ctx.counted_attempt() >= ctx.max_attempts() {
                    let reason = format!("out of attempts ({}); last: {error}", ctx.max_attempts());
                    webhook::set_dead_reason(pool, claim, endpoint.id, args.event_id, &reason).await?;
                }
                let retry_after = match &other {
                    Ok(WebhookResponse { status, retry_after: Some(ra), .. }) if honours_retry_after(*status) => {
                        parse_retry_after(ra, Utc::now())
                    }
                    _ => None,
                };
                let delay = retry_delay(
                    self.config.schedule.delay(recorded.attempts),
                    retry_after,
                    self.config.max_retry_after,
                );
                Err(Outcome::retry_after(error, delay))
            }
        }
    }
}

/// The wait before the next attempt: the schedule's delay, or the endpoint's `Retry-After` (capped
/// at `max_retry_after`) when that is longer. A short `Retry-After` never shortens the schedule, so
/// an endpoint that throttles every answer cannot use up the attempts faster than the schedule's
/// time span.
fn retry_delay(scheduled: Duration, retry_after: Option<Duration>, max_retry_after: Duration) -> Duration {
    retry_after.map_or(scheduled, |ra| scheduled.max(ra.min(max_retry_after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 25 Nov 2026 10:01:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("Wed, 25 Nov 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert!(honours_retry_after(429) && honours_retry_after(503) && !honours_retry_after(500));
    }

    #[test]
    fn retry_after_lengthens_the_schedule_and_never_shortens_it() {
        let s = |n| Duration::from_secs(n);
        assert_eq!(retry_delay(s(5), Some(s(1)), s(3600)), s(5), "a short Retry-After waits the schedule");
        assert_eq!(retry_delay(s(5), Some(s(120)), s(3600)), s(120));
        assert_eq!(retry_delay(s(5), Some(s(7200)), s(3600)), s(3600), "capped");
        assert_eq!(retry_delay(s(5), Some(s(7200)), s(1)), s(5), "the cap never undercuts the schedule");
        assert_eq!(retry_delay(s(5), None, s(3600)), s(5));
    }

    #[test]
    fn schedule_steps_then_repeats_its_last_delay_with_downward_jitter() {
        let s = RetrySchedule { delays: vec![Duration::from_secs(1), Duration::from_secs(10)], jitter: 0.5 };
        assert_eq!(s.delay_with(1, 0.0), Duration::from_secs(1));
        assert_eq!(s.delay_with(2, 0.0), Duration::from_secs(10));
        assert_eq!(s.delay_with(9, 0.0), Duration::from_secs(10));
        assert_eq!(s.delay_with(0, 0.0), Duration::from_secs(1));
        assert_eq!(s.delay_with(2, 1.0), Duration::from_secs(5));
        for _ in 0..100 {
            let d = s.delay(2);
            assert!(d > Duration::from_secs(5) && d <= Duration::from_secs(10), "{d:?}");
        }
    }

    #[test]
    fn the_body_is_the_same_bytes_every_time() {
        let event = StoredEvent {
            id: EventId(1),
            message_id: "msg_1".into(),
            topic: "invoice.paid".into(),
            payload: serde_json::json!({"z": 1, "a": [1, 2]}),
            ordering_key: None,
            created_at: DateTime::parse_from_rfc3339("2026-11-25T10:00:00.5Z").unwrap().with_timezone(&Utc),
        };
        let body = event_body(&event);
        assert_eq!(body, event_body(&event));
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"data":{"a":[1,2],"z":1},"timestamp":"2026-11-25T10:00:00.500000Z","type":"invoice.paid"}"#
        );
    }
}
