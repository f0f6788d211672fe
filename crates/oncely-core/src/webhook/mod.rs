//! Webhook endpoints, their secrets, and the record of each delivery — the database side of webhook
//! delivery. Sending (HTTP, signatures, the retry schedule) is the `oncely-webhooks` crate's.
//!
//! An endpoint has a URL, the topics it receives (`*` for all), a `whsec_` secret, and an enabled
//! flag. Rotating the secret keeps the old one signing beside the new one for an overlap, so
//! receivers can switch without dropping a message. A disabled endpoint receives nothing new, and
//! its pending deliveries fail into the dead letter, where a person can retry them after enabling it.
//!
//! Endpoints are here; [the endpoint policy](EndpointPolicy) (which URLs may be created) and the
//! delivery records are in their own files, re-exported here.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row};

use crate::error::{Error, Result};
use crate::outbox::{self, Event};
use crate::secrets;
pub use crate::secrets::{WebhookSecret, MAX_SECRET_BYTES, MIN_SECRET_BYTES, SECRET_PREFIX};
pub use delivery::*;
pub use policy::{is_public_address, EndpointPolicy};

mod delivery;
mod policy;

use policy::validate_url;

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
    let row = crate::pooler::query(&sql)
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
    let row = crate::pooler::query(&sql).bind(id).fetch_optional(executor).await?;
    endpoint_from_row(&row.ok_or(Error::NotFound { what: "webhook endpoint", id: id.0 })?)
}

/// All endpoints, oldest first.
pub async fn list_endpoints<'e>(executor: impl PgExecutor<'e>) -> Result<Vec<Endpoint>> {
    let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM oncely.webhook_endpoints p ORDER BY id");
    crate::pooler::query(&sql).fetch_all(executor).await?.iter().map(endpoint_from_row).collect()
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
    let row = crate::pooler::query(&sql)
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
    let row =
        crate::pooler::query(&sql).bind(id).bind(&update.url).bind(&update.topics).fetch_optional(executor).await?;
    endpoint_from_row(&row.ok_or(Error::NotFound { what: "webhook endpoint", id: id.0 })?)
}

/// Delete an endpoint with its delivery records, and cancel its pending delivery jobs (a running
/// attempt may still finish its request; its record write then finds nothing). Returns how many
/// pending deliveries were cancelled.
pub fn delete_endpoint<'a, A>(db: A, id: EndpointId) -> futures::future::BoxFuture<'a, Result<u64>>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres> + Send + 'a,
{
    // A boxed `Send` future: an `async fn` generic over `Acquire` is not `Send` for a
    // `&mut PgConnection` argument (the bound is higher-ranked), which spawned tasks and
    // axum handlers need.
    Box::pin(async move {
        let result: Result<u64> = async move {
            let mut tx = db.begin().await?;
            let jobs: Vec<i64> =
                crate::pooler::query_scalar("SELECT job_id FROM oncely.webhook_deliveries WHERE endpoint_id = $1")
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
            let cancelled = crate::pooler::query(crate::job::sql::JOB_CANCEL_MANY)
                .bind(&jobs)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let deleted = crate::pooler::query("DELETE FROM oncely.webhook_endpoints WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if deleted.rows_affected() == 0 {
                return Err(Error::NotFound { what: "webhook endpoint", id: id.0 });
            }
            tx.commit().await?;
            tracing::info!(endpoint.id = %id, cancelled, "webhook endpoint deleted");
            Ok(cancelled)
        }
        .await;
        result
    })
}

/// Disable an endpoint and publish an [`ENDPOINT_DISABLED_TOPIC`](outbox::ENDPOINT_DISABLED_TOPIC)
/// event (`{endpoint_id, url, reason}`) in the same transaction. Returns false (and publishes
/// nothing) when it was already disabled. Pending deliveries to it fail into the dead letter when
/// next attempted.
pub fn disable_endpoint<'a, A>(db: A, id: EndpointId, reason: &'a str) -> futures::future::BoxFuture<'a, Result<bool>>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres> + Send + 'a,
{
    // A boxed `Send` future: an `async fn` generic over `Acquire` is not `Send` for a
    // `&mut PgConnection` argument (the bound is higher-ranked), which spawned tasks and
    // axum handlers need.
    Box::pin(async move {
        let result: Result<bool> = async move {
            let mut tx = db.begin().await?;
            let disabled = disable_in(&mut tx, id, reason).await?;
            tx.commit().await?;
            if disabled {
                tracing::warn!(endpoint.id = %id, %reason, "webhook endpoint disabled");
            }
            Ok(disabled)
        }
        .await;
        result
    })
}

pub(super) async fn disable_in(tx: &mut sqlx::PgConnection, id: EndpointId, reason: &str) -> Result<bool> {
    let url: Option<String> = crate::pooler::query_scalar(
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
    let done = crate::pooler::query(
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
