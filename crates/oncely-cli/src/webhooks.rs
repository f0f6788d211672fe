//! `oncely webhooks ...`: endpoints and deliveries, for the person on call.

use oncely_core::outbox::EventId;
use oncely_core::webhook::{self, DeliveryFilter, EndpointId, NewEndpoint};
use sqlx::PgPool;

use crate::{table, Fail};

pub(crate) async fn add(pool: &PgPool, url: String, topics: Vec<String>, ordered: bool) -> Result<(), Fail> {
    let ep = webhook::create_endpoint(pool, &NewEndpoint::new(url, topics).ordered(ordered)).await?;
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
                e.failing_since.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default(),
                state,
            ]
        })
        .collect();
    print!("{}", table::render(&["ID", "URL", "TOPICS", "ORDERED", "FAILING SINCE", "STATE"], &rows, &[0]));
    Ok(())
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
            vec![
                d.endpoint_id.to_string(),
                d.event_id.to_string(),
                d.message_id,
                format!("{:?}", d.state).to_lowercase(),
                d.attempts.to_string(),
                d.last_status.map(|s| s.to_string()).unwrap_or_default(),
                d.job_id.to_string(),
                d.last_error.as_deref().and_then(|e| e.lines().next()).unwrap_or_default().chars().take(60).collect(),
            ]
        })
        .collect();
    let header = ["ENDPOINT", "EVENT", "WEBHOOK-ID", "STATE", "ATTEMPTS", "STATUS", "JOB", "LAST ERROR"];
    print!("{}", table::render(&header, &rows, &[0, 1, 4, 5, 6]));
    Ok(())
}

pub(crate) async fn redeliver(pool: &PgPool, endpoint: i64, event: i64) -> Result<(), Fail> {
    let job = webhook::redeliver(pool, EndpointId(endpoint), EventId(event)).await?;
    println!("event {event} to endpoint {endpoint}: delivery job {job} queued (same webhook-id)");
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
