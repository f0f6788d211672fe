//! Prometheus metrics: the recorder `oncely serve` installs, and the queue-depth gauges refreshed
//! on each scrape.
//!
//! oncely's crates emit through the [`metrics`] facade, which does nothing until a recorder is
//! installed, so embedders pay nothing and choose their exporter. [`install_prometheus`]
//! installs `metrics-exporter-prometheus`'s recorder (no HTTP listener of its own: the dashboard's
//! `/metrics` renders it). The names are listed in `docs/operations.md`.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::Row;

/// Queue depth by queue and state (`available` counts jobs due now).
pub const QUEUE_DEPTH: &str = "oncely_queue_depth";
/// Age in seconds of the oldest job due and not yet claimed, by queue.
pub const OLDEST_AVAILABLE_AGE: &str = "oncely_queue_oldest_available_age_seconds";

/// Histogram buckets, in seconds, for handler duration and enqueue-to-start latency.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Buckets for claim batch sizes.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

/// Install the process-wide Prometheus recorder, with histogram buckets for oncely's histograms;
/// fails if another recorder is installed (then pass that one's handle to the dashboard).
pub fn install_prometheus() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("oncely_claim_batch_size".into()), BATCH_BUCKETS)?
        .install_recorder()
}

/// Refresh the queue gauges with one grouped query over unfinished and dead jobs. Every state
/// of a seen queue is set, so a drained state reads 0 rather than its last value.
pub async fn record_queue_depth(pool: &sqlx::PgPool) -> sqlx::Result<()> {
    let rows = sqlx::query(crate::sql::DEPTH).fetch_all(pool).await?;
    let mut by_queue: std::collections::BTreeMap<String, ([f64; 3], f64)> = Default::default();
    for row in rows {
        let queue: String = row.try_get("queue")?;
        let state: String = row.try_get("state")?;
        let n: i64 = row.try_get("n")?;
        let oldest: f64 = row.try_get("oldest")?;
        let entry = by_queue.entry(queue).or_default();
        let i = match state.as_str() {
            "available" => 0,
            "running" => 1,
            _ => 2,
        };
        entry.0[i] = n as f64;
        entry.1 = entry.1.max(oldest);
    }
    for (queue, (counts, oldest)) in by_queue {
        for (state, n) in ["available", "running", "dead"].into_iter().zip(counts) {
            metrics::gauge!(QUEUE_DEPTH, "queue" => queue.clone(), "state" => state).set(n);
        }
        metrics::gauge!(OLDEST_AVAILABLE_AGE, "queue" => queue).set(oldest);
    }
    Ok(())
}

/// Whether the database has every migration this build of oncely knows.
pub async fn migrated(pool: &sqlx::PgPool) -> sqlx::Result<bool> {
    let applied: Vec<i64> = match sqlx::query_scalar("SELECT version FROM oncely._migrations").fetch_all(pool).await {
        Ok(v) => v,
        // No history table yet: not migrated (the database itself answered).
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(oncely_core::MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}
