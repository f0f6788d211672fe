//! `oncely migrate`, `oncely jobs ...`, `oncely stats`, `oncely purge`.

use std::collections::BTreeSet;
use std::time::Duration;

use oncely_core::{JobFilter, JobId, JobState};
use sqlx::PgPool;

use crate::{table, Fail};

/// Rows deleted per statement by `purge`.
const PURGE_BATCH: i64 = 10_000;

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

pub(crate) async fn migrate(pool: &PgPool) -> Result<(), Fail> {
    let report = oncely_core::migrate_report(pool).await?;
    if !report.moved.is_empty() {
        println!(
            "moved the history of {} migrations from _sqlx_migrations to {}",
            report.moved.len(),
            oncely_core::MIGRATIONS_TABLE
        );
    }
    for m in oncely_core::MIGRATOR.iter().filter(|m| report.applied.contains(&m.version)) {
        println!("applied {} {}", m.version, m.description);
    }
    if report.applied.is_empty() {
        println!("schema up to date: 0 new migrations, {} applied in all", report.recorded);
    } else {
        println!("{} new migrations applied, {} in all", report.applied.len(), report.recorded);
    }
    Ok(())
}

pub(crate) async fn list(pool: &PgPool, filter: &JobFilter) -> Result<(), Fail> {
    let jobs = oncely_core::list_jobs(pool, filter).await?;
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.kind.clone(),
                j.queue.clone(),
                j.state.to_string(),
                format!("{}/{}", j.counted_attempts(), j.max_attempts),
                j.run_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                j.errors.last().map(|e| first_line(&e.message).to_owned()).unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["id", "kind", "queue", "state", "attempts", "run_at (UTC)", "last error"], &rows, &[0, 4])
    );
    println!("({} jobs)", jobs.len());
    Ok(())
}

pub(crate) async fn show(pool: &PgPool, id: i64) -> Result<(), Fail> {
    let j = oncely_core::get_job(pool, JobId(id)).await?;
    let opt = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
    println!("id:               {}", j.id);
    println!("kind:             {}", j.kind);
    println!("queue:            {}", j.queue);
    println!("state:            {}", j.state);
    println!("priority:         {}", j.priority);
    println!(
        "attempts:         {} of {} counted ({} claims, {} given back: snoozed, released or a lone lease expiry)",
        j.counted_attempts(),
        j.max_attempts,
        j.attempt,
        j.snoozes
    );
    println!("run_at:           {}", j.run_at);
    println!("created_at:       {}", j.created_at);
    println!("attempted_at:     {}", opt(j.attempted_at));
    println!("finished_at:      {}", opt(j.finished_at));
    println!("lease_expires_at: {}", opt(j.lease_expires_at));
    println!("worker_id:        {}", j.worker_id.as_deref().unwrap_or("-"));
    println!("unique_key:       {}", j.unique_key.as_deref().unwrap_or("-"));
    println!("args:             {}", serde_json::to_string_pretty(&j.args)?.replace('\n', "\n                  "));
    println!("errors:           {}", j.errors.len());
    for e in &j.errors {
        let kind = serde_json::to_value(e.kind)?.as_str().unwrap_or_default().to_owned();
        println!("  attempt {} at {} ({kind}):", e.attempt, e.at);
        for l in e.message.lines() {
            println!("    {l}");
        }
    }
    Ok(())
}

pub(crate) async fn cancel(pool: &PgPool, id: i64) -> Result<(), Fail> {
    oncely_core::cancel_job(&mut *pool.acquire().await?, JobId(id)).await?;
    println!("job {id} cancelled");
    Ok(())
}

pub(crate) async fn retry(pool: &PgPool, id: i64) -> Result<(), Fail> {
    oncely_core::retry_job(&mut *pool.acquire().await?, JobId(id)).await?;
    println!("job {id} is available again");
    Ok(())
}

pub(crate) async fn stats(pool: &PgPool) -> Result<(), Fail> {
    let counts = oncely_core::count_jobs(pool).await?;
    let queues: BTreeSet<&str> = counts.iter().map(|c| c.queue.as_str()).collect();
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            let mut row = vec![(*q).to_owned()];
            let mut total = 0;
            for s in JobState::ALL {
                let n = counts.iter().find(|c| c.queue == *q && c.state == s).map_or(0, |c| c.count);
                total += n;
                row.push(n.to_string());
            }
            row.push(total.to_string());
            row
        })
        .collect();
    let mut header = vec!["queue"];
    header.extend(JobState::ALL.map(JobState::as_str));
    header.push("total");
    print!("{}", table::render(&header, &rows, &[1, 2, 3, 4, 5, 6]));
    if rows.is_empty() {
        println!("(no jobs)");
    }
    Ok(())
}

pub(crate) async fn purge(pool: &PgPool, older_than: Duration, dead_older_than: Duration) -> Result<(), Fail> {
    let mut total = 0;
    loop {
        let n = oncely_core::maintenance::prune_finished(pool, older_than, dead_older_than, PURGE_BATCH).await?;
        total += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    // Expired step records and idempotency keys too, with an audit row in oncely.maintenance_runs.
    let ledger = oncely_core::ledger::cleanup_expired(pool, PURGE_BATCH, Some("oncely purge")).await?;
    println!(
        "deleted {total} finished jobs (completed and cancelled older than {}, dead older than {}) and {ledger} expired ledger records",
        crate::duration::format(older_than),
        crate::duration::format(dead_older_than)
    );
    Ok(())
}
