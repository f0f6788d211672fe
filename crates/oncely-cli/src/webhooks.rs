//! `oncely webhooks ...`: endpoints and deliveries, for the person on call.

use std::time::Duration;

use chrono::{DateTime, Utc};
use oncely_core::outbox::EventId;
use oncely_core::webhook::{
    self, DeliveryFilter, DeliveryState, EndpointId, EndpointPolicy, EndpointUpdate, NewEndpoint, RedeliverFilter,
    WebhookSecret,
};
use sqlx::PgPool;

use crate::{duration, table, Fail};

/// The URL policy of the CLI: the delivery transport's default, unless private networks are allowed.
fn policy(allow_private_network: bool) -> EndpointPolicy {
    EndpointPolicy::default().allow_private_networks(allow_private_network)
}

pub(crate) async fn add(
    pool: &PgPool,
    url: String,
    topics: Vec<String>,
    ordered: bool,
    secret: Option<String>,
    allow_private_network: bool,
) -> Result<(), Fail> {
    let mut new = NewEndpoint::new(url, topics).ordered(ordered).policy(policy(allow_private_network));
    if let Some(secret) = secret {
        new = new.secret(WebhookSecret::parse(&secret)?);
    }
    let ep = webhook::create_endpoint(pool, &new).await?;
    println!("endpoint {} created for {}", ep.id, ep.url);
    println!("secret (give it to the receiver; it is not shown again by `endpoints`): {}", ep.secret.as_str());
    Ok(())
}

pub(crate) async fn endpoints(pool: &PgPool) -> Result<(), Fail> {
    let rows: Vec<Vec<String>> = webhook::list_endpoints(pool)
        .await?
        .into_iter()
        .map(|e| {
            let state = if e.enabled {
                "enabled".to_owned()
            } else {
                format!("disabled: {}", e.disabled_reason.unwrap_or_default())
            };
            vec![
                e.id.to_string(),
                e.url,
                e.topics.join(","),
                if e.ordered { "yes" } else { "no" }.to_owned(),
                e.failing_since.map(time).unwrap_or_default(),
                e.rotation_ends_at.map(|t| format!("until {}", time(t))).unwrap_or_default(),
                state,
            ]
        })
        .collect();
    let header = ["ID", "URL", "TOPICS", "ORDERED", "FAILING SINCE", "ROTATING", "STATE"];
    print!("{}", table::render(&header, &rows, &[0]));
    Ok(())
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub(crate) async fn deliveries(
    pool: &PgPool,
    endpoint: Option<i64>,
    undelivered: bool,
    limit: i64,
) -> Result<(), Fail> {
    let filter = DeliveryFilter { endpoint: endpoint.map(EndpointId), event: None, undelivered, limit: Some(limit) };
    let rows: Vec<Vec<String>> = webhook::list_deliveries(pool, &filter)
        .await?
        .into_iter()
        .map(|d| {
            // A dead delivery says why it died; the others show their last failure.
            let why = match (d.state, &d.dead_reason) {
                (DeliveryState::Dead, Some(reason)) => Some(reason.as_str()),
                _ => d.last_error.as_deref(),
            };
            vec![
                d.endpoint_id.to_string(),
                d.event_id.to_string(),
                d.message_id,
                format!("{:?}", d.state).to_lowercase(),
                d.attempts.to_string(),
                d.last_status.map(|s| s.to_string()).unwrap_or_default(),
                d.job_id.to_string(),
                why.and_then(|e| e.lines().next()).unwrap_or_default().chars().take(80).collect(),
            ]
        })
        .collect();
    let header = ["ENDPOINT", "EVENT", "WEBHOOK-ID", "STATE", "ATTEMPTS", "STATUS", "JOB", "WHY"];
    print!("{}", table::render(&header, &rows, &[0, 1, 4, 5, 6]));
    Ok(())
}

pub(crate) async fn redeliver(pool: &PgPool, endpoint: i64, event: i64) -> Result<(), Fail> {
    let job = webhook::redeliver(pool, EndpointId(endpoint), EventId(event)).await?;
    println!("event {event} to endpoint {endpoint}: delivery job {job} queued (same webhook-id)");
    Ok(())
}

/// A point in time on the command line: RFC 3339 (`2026-11-30T12:00:00Z`), or a duration meaning
/// that long ago (`2h`).
pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = duration::parse(s).map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration such as 2h"))?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| format!("`{s}` is too long"))?;
    Ok(Utc::now() - ago)
}

pub(crate) async fn redeliver_dead(
    pool: &PgPool,
    endpoint: Option<i64>,
    topic: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<(), Fail> {
    let filter = RedeliverFilter { endpoint: endpoint.map(EndpointId), topic, since, until, limit: Some(limit) };
    let done = webhook::redeliver_dead(pool, &filter).await?;
    for r in &done {
        println!("event {} to endpoint {}: delivery job {} queued", r.event_id, r.endpoint_id, r.job_id);
    }
    println!("{} dead deliveries queued again (same webhook-ids)", done.len());
    Ok(())
}

pub(crate) async fn enable(pool: &PgPool, endpoint: i64) -> Result<(), Fail> {
    webhook::enable_endpoint(pool, EndpointId(endpoint)).await?;
    println!("endpoint {endpoint} enabled; `oncely webhooks redeliver` resends what failed meanwhile");
    Ok(())
}

pub(crate) async fn disable(pool: &PgPool, endpoint: i64, reason: &str) -> Result<(), Fail> {
    if webhook::disable_endpoint(pool, EndpointId(endpoint), reason).await? {
        println!("endpoint {endpoint} disabled");
    } else {
        println!("endpoint {endpoint} was already disabled");
    }
    Ok(())
}

pub(crate) async fn reencrypt_secrets(pool: &PgPool) -> Result<(), Fail> {
    let done = oncely_core::secrets::reencrypt_endpoint_secrets(pool).await?;
    println!(
        "re-encrypted the secrets of {} endpoint(s); {} already under the current key",
        done.rewritten, done.unchanged
    );
    Ok(())
}

pub(crate) async fn rotate_secret(
    pool: &PgPool,
    endpoint: i64,
    secret: Option<String>,
    overlap: Duration,
) -> Result<(), Fail> {
    let secret = secret.map(|s| WebhookSecret::parse(&s)).transpose()?.unwrap_or_else(WebhookSecret::generate);
    let ep = webhook::rotate_secret(pool, EndpointId(endpoint), &secret, overlap).await?;
    println!("endpoint {endpoint}: new secret (give it to the receiver): {}", ep.secret.as_str());
    match ep.rotation_ends_at {
        Some(t) => println!("the previous secret keeps signing until {} UTC", time(t)),
        None => println!("the previous secret no longer signs"),
    }
    Ok(())
}

pub(crate) async fn update(
    pool: &PgPool,
    endpoint: i64,
    url: Option<String>,
    topics: Vec<String>,
    allow_private_network: bool,
) -> Result<(), Fail> {
    if url.is_none() && topics.is_empty() {
        return Err(Fail("nothing to change: give --url and/or --topic".into()));
    }
    let update =
        EndpointUpdate { url, topics: (!topics.is_empty()).then_some(topics), policy: policy(allow_private_network) };
    let ep = webhook::update_endpoint(pool, EndpointId(endpoint), &update).await?;
    println!("endpoint {}: {} topics {}", ep.id, ep.url, ep.topics.join(","));
    Ok(())
}

pub(crate) async fn delete(pool: &PgPool, endpoint: i64) -> Result<(), Fail> {
    let cancelled = webhook::delete_endpoint(pool, EndpointId(endpoint)).await?;
    println!("endpoint {endpoint} deleted with its delivery records; {cancelled} pending deliveries cancelled");
    Ok(())
}
