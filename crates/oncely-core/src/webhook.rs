//! Webhook endpoints, their secrets, and the record of each delivery — the database side of webhook
//! delivery. Sending (HTTP, signatures, the retry schedule) is the `oncely-webhooks` crate's.
//!
//! An endpoint has a URL, the topics it receives (`*` for all), a `whsec_` secret, and an enabled
//! flag. Rotating the secret keeps the old one signing beside the new one for an overlap, so
//! receivers can switch without dropping a message. A disabled endpoint receives nothing new, and
//! its pending deliveries fail into the dead letter, where a person can retry them after enabling it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool, Row};

use crate::error::{Error, Result};
use crate::job::{JobId, JobState};
use crate::lease::Claim;
use crate::outbox::{self, message_id, Event, EventId};
use crate::secrets;
pub use crate::secrets::{WebhookSecret, MAX_SECRET_BYTES, MIN_SECRET_BYTES, SECRET_PREFIX};

/// Defaults to 24 hours: how long the previous secret keeps signing after a rotation.
pub const DEFAULT_ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// An endpoint's id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize, sqlx::Type,
)]
#[sqlx(transparent)]
#[serde(transparent)]
pub struct EndpointId(pub i64);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An endpoint to create.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// use oncely_core::webhook::{create_endpoint, NewEndpoint};
/// let endpoint = create_endpoint(&pool, &NewEndpoint::new("https://example.com/hooks", ["invoice.paid"])).await?;
/// println!("give the receiver its secret: {}", endpoint.secret.as_str());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    /// Where to POST.
    pub url: String,
    /// The topics to receive; `*` for all.
    pub topics: Vec<String>,
    /// The signing secret. Defaults to a new random one.
    pub secret: Option<WebhookSecret>,
    /// Deliver events that share an ordering key one at a time, in order. Defaults to false.
    pub ordered: bool,
    /// Which URLs are accepted. Defaults to [`EndpointPolicy::default`]: `http` and `https`, public
    /// addresses only. Pass your transport's policy (`HttpTransport::endpoint_policy` in
    /// `oncely-webhooks`) so that an endpoint it could never send to is refused now.
    pub policy: EndpointPolicy,
}

impl NewEndpoint {
    /// An endpoint for `url` receiving `topics`, with a new secret, unordered.
    pub fn new<T: Into<String>>(url: impl Into<String>, topics: impl IntoIterator<Item = T>) -> Self {
        NewEndpoint {
            url: url.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            secret: None,
            ordered: false,
            policy: EndpointPolicy::default(),
        }
    }

    /// Use this secret.
    pub fn secret(mut self, secret: WebhookSecret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Ordered delivery per ordering key.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Accept URLs by this policy (typically the delivery transport's).
    pub fn policy(mut self, policy: EndpointPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn validate(&self) -> Result<()> {
        validate_url(&self.url)?;
        self.policy.check(&self.url)?;
        if self.topics.is_empty() {
            return Err(Error::InvalidInput("an endpoint needs at least one topic (`*` for all)".into()));
        }
        for topic in &self.topics {
            outbox::validate_topic(topic)?;
        }
        Ok(())
    }
}

/// Which endpoint URLs can be sent to: checked when an endpoint is created or its URL changed, so
/// that an endpoint the delivery transport would refuse is refused at once with a clear error
/// instead of failing at every delivery.
///
/// The address check here sees only the URL: an IP literal, or the name `localhost` (and
/// `*.localhost`). A host name that resolves to a private address can only be caught when it is
/// resolved, which the transport does before each connection.
///
/// # Example
///
/// ```
/// use oncely_core::webhook::EndpointPolicy;
/// let policy = EndpointPolicy::default();
/// assert!(policy.check("https://hooks.example.com/in").is_ok());
/// assert!(policy.check("http://169.254.169.254/latest").is_err());
/// assert!(policy.check("http://localhost:8080/").is_err());
/// assert!(EndpointPolicy::default().allow_private_networks(true).check("http://localhost:8080/").is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// URL schemes the transport sends, lowercase. Defaults to `http` and `https`.
    pub schemes: Vec<String>,
    /// Accept loopback, private, link-local and other non-public addresses. Defaults to false.
    pub allow_private_networks: bool,
}

impl Default for EndpointPolicy {
    fn default() -> Self {
        EndpointPolicy { schemes: vec!["http".into(), "https".into()], allow_private_networks: false }
    }
}

impl EndpointPolicy {
    /// Accept (or not) non-public addresses.
    pub fn allow_private_networks(mut self, allow: bool) -> Self {
        self.allow_private_networks = allow;
        self
    }

    /// Accept only these schemes.
    pub fn schemes<S: Into<String>>(mut self, schemes: impl IntoIterator<Item = S>) -> Self {
        self.schemes = schemes.into_iter().map(|s| s.into().to_ascii_lowercase()).collect();
        self
    }

    /// Check `url` against the policy: [`Error::InvalidInput`] naming what is wrong.
    pub fn check(&self, url: &str) -> Result<()> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| Error::InvalidInput(format!("endpoint URL is not an absolute URL: {url:?}")))?;
        let scheme = scheme.to_ascii_lowercase();
        if !self.schemes.contains(&scheme) {
            return Err(Error::InvalidInput(format!(
                "endpoint URL scheme {scheme}:// cannot be sent by the delivery transport (it sends {})",
                self.schemes.iter().map(|s| format!("{s}://")).collect::<Vec<_>>().join(", ")
            )));
        }
        if self.allow_private_networks {
            return Ok(());
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if let Some(v6) = host_port.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            host_port.split(':').next().unwrap_or("")
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let private = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => !is_public_address(ip),
            Err(_) => host == "localhost" || host.ends_with(".localhost"),
        };
        if private {
            return Err(Error::InvalidInput(format!(
                "endpoint URL {url:?} names a loopback or private address ({host}), which the delivery transport \
                 refuses; allow private networks on both the transport and the endpoint policy to use it"
            )));
        }
        Ok(())
    }
}

/// Whether an endpoint may be sent to at `ip`: false for loopback, private (RFC 1918, IPv6 unique
/// local), shared (100.64.0.0/10), link-local (which includes cloud metadata services at
/// 169.254.169.254), unspecified, broadcast, multicast, documentation, benchmarking and reserved
/// addresses, and for IPv6 addresses that embed such an IPv4 address.
pub fn is_public_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier-grade NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed inside some networks)
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001) // local-use NAT64 (RFC 8215)
        || (s[0] == 0x2002 && !is_public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8))) // 6to4 of a non-public IPv4
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b && !is_public_v4(embedded_v4(s))) // NAT64 of a non-public IPv4
        || (s[..6] == [0; 6] && !is_public_v4(embedded_v4(s)))) // IPv4-compatible (deprecated)
}

fn embedded_v4(s: [u16; 8]) -> Ipv4Addr {
    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)
}

fn validate_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| Error::InvalidInput(format!("endpoint URL must start with http:// or https://, got {url:?}")))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidInput(format!("endpoint URL is not a valid absolute URL: {url:?}")));
    }
    Ok(())
}

/// A webhook endpoint as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Its id.
    pub id: EndpointId,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Topics it receives.
    pub topics: Vec<String>,
    /// The current signing secret.
    pub secret: WebhookSecret,
    /// The previous secret, while a rotation's overlap lasts (it signs too).
    pub previous_secret: Option<WebhookSecret>,
    /// When the rotation's overlap ends (the previous secret stops signing), while one is in
    /// progress.
    pub rotation_ends_at: Option<DateTime<Utc>>,
    /// Ordered delivery per ordering key.
    pub ordered: bool,
    /// False once disabled (410 Gone, failing too long, or by a person).
    pub enabled: bool,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// Start of the current run of failures.
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl Endpoint {
    /// The secrets that sign a delivery now: the current one, then the previous one during a
    /// rotation.
    pub fn signing_secrets(&self) -> Vec<&WebhookSecret> {
        std::iter::once(&self.secret).chain(self.previous_secret.as_ref()).collect()
    }
}

/// Columns of an endpoint row, with the table aliased `p` in every statement.
const ENDPOINT_COLUMNS: &str = "p.id, p.url, p.topics, p.secret, \
    CASE WHEN p.previous_secret_expires_at > now() THEN p.previous_secret END AS previous_secret, \
    CASE WHEN p.previous_secret_expires_at > now() THEN p.previous_secret_expires_at END AS rotation_ends_at, \
    p.ordered, p.enabled, p.disabled_reason, p.failing_since, p.created_at";

fn endpoint_from_row(row: &sqlx::postgres::PgRow) -> Result<Endpoint> {
    let previous: Option<String> = row.try_get("previous_secret")?;
    Ok(Endpoint {
        id: EndpointId(row.try_get("id")?),
        url: row.try_get("url")?,
        topics: row.try_get("topics")?,
        secret: WebhookSecret::parse(&secrets::open(row.try_get("secret")?)?)?,
        previous_secret: previous.as_deref().map(|p| WebhookSecret::parse(&secrets::open(p)?)).transpose()?,
        rotation_ends_at: row.try_get("rotation_ends_at")?,
        ordered: row.try_get("ordered")?,
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        failing_since: row.try_get("failing_since")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Create an endpoint. It receives events published after its transaction commits.
pub async fn create_endpoint<'e>(executor: impl PgExecutor<'e>, new: &NewEndpoint) -> Result<Endpoint> {
    new.validate()?;
    let secret = new.secret.clone().unwrap_or_else(WebhookSecret::generate);
    let sql = format!(
        "INSERT INTO oncely.webhook_endpoints AS p (url, topics, secret, ordered) VALUES ($1, $2, $3, $4) RETURNING {ENDPOINT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(&new.url)
        .bind(&new.topics)
        .bind(secrets::seal(secret.as_str()))
        .bind(new.ordered)
        .fetch_one(executor)
        .await?;
    endpoint_from_row(&row)
}

/// Fetch one endpoint.
pub async fn get_endpoint<'e>(executor: impl PgExecutor<'e>, id: EndpointId) -> Result<Endpoint> {
    let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM oncely.webhook_endpoints p WHERE id = $1");
    let row = sqlx::query(&sql).bind(id).fetch_optional(executor).await?;
    endpoint_from_row(&row.ok_or(Error::NotFound { what: "webhook endpoint", id: id.0 })?)
}

/// All endpoints, oldest first.
pub async fn list_endpoints<'e>(executor: impl PgExecutor<'e>) -> Result<Vec<Endpoint>> {
    let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM oncely.webhook_endpoints p ORDER BY id");
    sqlx::query(&sql).fetch_all(executor).await?.iter().map(endpoint_from_row).collect()
}

/// Rotate an endpoint's secret: `new` signs from now on, and the current one keeps signing too for
/// `overlap` (both signatures are sent), so receivers can switch without dropping a message.
pub async fn rotate_secret<'e>(
    executor: impl PgExecutor<'e>,
    id: EndpointId,
    new: &WebhookSecret,
    overlap: Duration,
) -> Result<Endpoint> {
    let sql = format!(
        "UPDATE oncely.webhook_endpoints p SET previous_secret = secret, secret = $2, \
         previous_secret_expires_at = now() + make_interval(secs => $3), updated_at = now() \
         WHERE id = $1 RETURNING {ENDPOINT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(secrets::seal(new.as_str()))
        .bind(overlap.as_secs_f64())
        .fetch_optional(executor)
        .await?;
    endpoint_from_row(&row.ok_or(Error::NotFound { what: "webhook endpoint", id: id.0 })?)
}

/// A change to an endpoint's URL or topics ([`update_endpoint`]); `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct EndpointUpdate {
    /// The new URL, checked like a new endpoint's.
    pub url: Option<String>,
    /// The new topics; `*` for all.
    pub topics: Option<Vec<String>>,
    /// The policy the new URL is checked against. Defaults to [`EndpointPolicy::default`].
    pub policy: EndpointPolicy,
}

/// Change an endpoint's URL and/or topics. New topics apply to events published after the
/// transaction commits; a new URL applies to every later attempt, including the pending ones.
pub async fn update_endpoint<'e>(
    executor: impl PgExecutor<'e>,
    id: EndpointId,
    update: &EndpointUpdate,
) -> Result<Endpoint> {
    if let Some(url) = &update.url {
        validate_url(url)?;
        update.policy.check(url)?;
    }
    if let Some(topics) = &update.topics {
        if topics.is_empty() {
            return Err(Error::InvalidInput("an endpoint needs at least one topic (`*` for all)".into()));
        }
        for topic in topics {
            outbox::validate_topic(topic)?;
        }
    }
    let sql = format!(
        "UPDATE oncely.webhook_endpoints p SET url = coalesce($2, url), topics = coalesce($3, topics), updated_at = now() \
         WHERE id = $1 RETURNING {ENDPOINT_COLUMNS}"
    );
    let row = sqlx::query(&sql).bind(id).bind(&update.url).bind(&update.topics).fetch_optional(executor).await?;
    endpoint_from_row(&row.ok_or(Error::NotFound { what: "webhook endpoint", id: id.0 })?)
}

/// Delete an endpoint with its delivery records, and cancel its pending delivery jobs (a running
/// attempt may still finish its request; its record write then finds nothing). Returns how many
/// pending deliveries were cancelled.
pub async fn delete_endpoint(db: impl sqlx::Acquire<'_, Database = sqlx::Postgres>, id: EndpointId) -> Result<u64> {
    let mut tx = db.begin().await?;
    let cancelled = sqlx::query(
        "UPDATE oncely.jobs SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL \
         WHERE id IN (SELECT job_id FROM oncely.webhook_deliveries WHERE endpoint_id = $1) \
           AND state IN ('available', 'running')",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let deleted = sqlx::query("DELETE FROM oncely.webhook_endpoints WHERE id = $1").bind(id).execute(&mut *tx).await?;
    if deleted.rows_affected() == 0 {
        return Err(Error::NotFound { what: "webhook endpoint", id: id.0 });
    }
    tx.commit().await?;
    tracing::info!(endpoint.id = %id, cancelled, "webhook endpoint deleted");
    Ok(cancelled)
}

/// Disable an endpoint and publish an [`ENDPOINT_DISABLED_TOPIC`](outbox::ENDPOINT_DISABLED_TOPIC)
/// event (`{endpoint_id, url, reason}`) in the same transaction. Returns false (and publishes
/// nothing) when it was already disabled. Pending deliveries to it fail into the dead letter when
/// next attempted.
pub async fn disable_endpoint(
    db: impl sqlx::Acquire<'_, Database = sqlx::Postgres>,
    id: EndpointId,
    reason: &str,
) -> Result<bool> {
    let mut tx = db.begin().await?;
    let disabled = disable_in(&mut tx, id, reason).await?;
    tx.commit().await?;
    if disabled {
        tracing::warn!(endpoint.id = %id, %reason, "webhook endpoint disabled");
    }
    Ok(disabled)
}

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
    let row = sqlx::query(
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

async fn disable_in(tx: &mut sqlx::PgConnection, id: EndpointId, reason: &str) -> Result<bool> {
    let url: Option<String> = sqlx::query_scalar(
        "UPDATE oncely.webhook_endpoints SET enabled = false, disabled_reason = $2, disabled_at = now(), updated_at = now() \
         WHERE id = $1 AND enabled RETURNING url",
    )
    .bind(id)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(url) = url else {
        // Already disabled, or absent: say which.
        get_endpoint(&mut *tx, id).await?;
        return Ok(false);
    };
    let payload = serde_json::json!({ "endpoint_id": id, "url": url, "reason": reason });
    outbox::publish(&mut *tx, &Event::from_json(outbox::ENDPOINT_DISABLED_TOPIC, payload)).await?;
    Ok(true)
}

/// Enable an endpoint again, clearing its failure run. Deliveries that failed while it was disabled
/// stay in the dead letter until retried ([`redeliver`] or `oncely jobs retry`).
pub async fn enable_endpoint<'e>(executor: impl PgExecutor<'e>, id: EndpointId) -> Result<()> {
    let done = sqlx::query(
        "UPDATE oncely.webhook_endpoints SET enabled = true, disabled_reason = NULL, disabled_at = NULL, \
         failing_since = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(executor)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound { what: "webhook endpoint", id: id.0 });
    }
    Ok(())
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
    let rows = sqlx::query(
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
/// at once. Enable it first ([`enable_endpoint`]).
pub async fn redeliver(
    db: impl sqlx::Acquire<'_, Database = sqlx::Postgres>,
    endpoint: EndpointId,
    event: EventId,
) -> Result<JobId> {
    let mut tx = db.begin().await?;
    let row = sqlx::query(
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
    sqlx::query(
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
pub async fn redeliver_dead(
    db: impl sqlx::Acquire<'_, Database = sqlx::Postgres>,
    filter: &RedeliverFilter,
) -> Result<Vec<Redelivered>> {
    if filter.limit.is_some_and(|l| l < 1) {
        return Err(Error::InvalidInput("limit must be at least 1".into()));
    }
    let mut conn = db.acquire().await?;
    let rows = sqlx::query(
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
    let row = sqlx::query(&sql)
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
    let due_in: Option<f64> = sqlx::query_scalar(
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
    let row = sqlx::query(DELIVERY_RECORD_ATTEMPT)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_and_topics_are_checked() {
        let local = EndpointPolicy::default().allow_private_networks(true);
        assert!(NewEndpoint::new("http://127.0.0.1:8080/hook", ["a"]).policy(local.clone()).validate().is_ok());
        assert!(NewEndpoint::new("https://example.com", ["*"]).validate().is_ok());
        for url in ["ftp://x", "http://", "example.com/hook", "http://a b/"] {
            assert!(NewEndpoint::new(url, ["a"]).validate().is_err(), "{url}");
        }
        assert!(NewEndpoint::new("http://x", Vec::<String>::new()).validate().is_err());
        assert!(NewEndpoint::new("http://x", ["has space"]).validate().is_err());
    }

    #[test]
    fn the_policy_refuses_schemes_the_transport_cannot_send_and_private_addresses() {
        let strict = EndpointPolicy::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "https://[::ffff:10.0.0.1]:443/",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://user:pw@192.168.1.1/",
            "http://LOCALHOST:3000/",
            "http://localhost./",
            "http://api.localhost/",
        ] {
            let err = strict.check(url).unwrap_err().to_string();
            assert!(err.contains("private address"), "{url}: {err}");
            assert!(strict.clone().allow_private_networks(true).check(url).is_ok(), "{url}");
        }
        for url in [
            "https://hooks.example.com/in",
            "http://8.8.8.8/",
            "https://[2606:4700::1111]/",
            "http://localhost.example.com/",
        ] {
            assert!(strict.check(url).is_ok(), "{url}");
        }
        let http_only = EndpointPolicy::default().schemes(["http"]);
        let err = http_only.check("https://hooks.example.com/").unwrap_err().to_string();
        assert!(err.contains("https://") && err.contains("cannot be sent"), "{err}");
    }
}
