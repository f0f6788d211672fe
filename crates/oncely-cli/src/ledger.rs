//! `oncely ledger show|resolve`: look at one effect record, and settle one whose outcome is
//! unknown (a parked step) after checking with the external system.

use oncely_core::ledger::{self, LedgerKey, Resolution};
use sqlx::{PgPool, Row};

use crate::Fail;

pub(crate) async fn show(pool: &PgPool, key: &LedgerKey) -> Result<(), Fail> {
    let row = sqlx::query(
        "SELECT state::text AS state, attempt, owner, previous_owner, lease_expires_at, lease_expires_at > now() AS live, \
                output, created_at, updated_at, expires_at \
         FROM oncely.ledger WHERE namespace = $1 AND key = $2",
    )
    .bind(&key.namespace)
    .bind(&key.key)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| Fail(format!("ledger record {key} not found")))?;
    let opt = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
    let state: String = row.try_get("state")?;
    let live: Option<bool> = row.try_get("live")?;
    let previous: Option<String> = row.try_get("previous_owner")?;
    println!("record:           {key}");
    println!("idempotency key:  {}", key.idempotency_key());
    let held = match (state.as_str(), live) {
        ("in_progress", Some(true)) => " (claimed now)",
        ("in_progress", _) => " (nobody holds it)",
        _ => "",
    };
    println!("state:            {state}{held}");
    println!("attempt:          {}", row.try_get::<i32, _>("attempt")?);
    println!("owner:            {}", row.try_get::<String, _>("owner")?);
    println!("previous owner:   {}", previous.as_deref().unwrap_or("-"));
    println!("lease_expires_at: {}", opt(row.try_get("lease_expires_at")?));
    let output: Option<serde_json::Value> = row.try_get("output")?;
    println!("output:           {}", output.map(|o| o.to_string()).unwrap_or_else(|| "-".into()));
    println!("created_at:       {}", row.try_get::<chrono::DateTime<chrono::Utc>, _>("created_at")?);
    println!("updated_at:       {}", row.try_get::<chrono::DateTime<chrono::Utc>, _>("updated_at")?);
    let expires: Option<chrono::DateTime<chrono::Utc>> = row.try_get("expires_at")?;
    println!("expires_at:       {}", expires.map(|t| t.to_string()).unwrap_or_else(|| "never (kept forever)".into()));
    if state == "in_progress" && previous.is_some() {
        println!();
        println!(
            "An earlier claimant ({}) left no result: the outcome of its call is unknown.",
            previous.unwrap_or_default()
        );
        println!("Check with the external system (it saw idempotency key {}), then", key.idempotency_key());
        println!(
            "  oncely ledger resolve {} '{}' --took-effect '<output as JSON>'   or   --did-not-take-effect",
            key.namespace, key.key
        );
        println!("and retry the job (oncely jobs retry <id>).");
    }
    Ok(())
}

pub(crate) async fn resolve(pool: &PgPool, key: &LedgerKey, took_effect: Option<String>) -> Result<(), Fail> {
    let resolution = match took_effect {
        Some(json) => Resolution::TookEffect(
            serde_json::from_str(&json)
                .map_err(|e| Fail(format!("--took-effect needs the step's output as JSON: {e}")))?,
        ),
        None => Resolution::DidNotTakeEffect,
    };
    ledger::resolve(pool, key, &resolution).await?;
    match resolution {
        Resolution::TookEffect(_) => {
            println!("ledger record {key} completed: the next attempt returns this output without calling again")
        }
        Resolution::DidNotTakeEffect => println!("ledger record {key} cleared: the next attempt runs the effect"),
    }
    Ok(())
}
