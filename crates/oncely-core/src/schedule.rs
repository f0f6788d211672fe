//! Cron schedules: one run per tick across the whole fleet.
//!
//! A cron function's schedule is a row of `oncely.schedules` holding its next tick. Every worker
//! calls [`tick_due`] every second or so (no leader needed): it locks a due row with
//! `FOR UPDATE SKIP LOCKED`, enqueues the tick's run (unique key `cron:{function}:{tick}`) and
//! advances `next_tick` in **one transaction**. Two workers never take one row at once; a worker
//! killed mid-way rolls back both the run and the advance, and the next worker takes the tick. So a
//! tick gets exactly one run, under restarts and whatever the maintenance leader is doing.
//!
//! **Missed ticks: run once.** Ticks that fell due while no worker ran (or while the database was
//! unreachable) are coalesced into one run for the latest of them, whose [`Tick::missed`] says how
//! many earlier ones it stands for; the schedule then resumes from the first tick after now. So a
//! nightly job missed during a day-long outage runs once when a worker comes back, not 1 time per
//! missed night, and never zero times. A handler that must do every missed period's work reads
//! `missed` (or its own bookkeeping) and catches up itself.
//!
//! Expressions are parsed by [`croner`] (chosen over `cron` for POSIX/Vixie semantics with
//! 5-field patterns, `L`/`W`/`#`, and time zones through chrono) in an IANA zone from `chrono-tz`.
//! Daylight-saving transitions follow croner: a local time skipped by the clock change does not
//! fire that day; a repeated one fires once.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use crate::error::{Error, Result};
use crate::function::Tick;
use crate::job::JobId;

/// Most ticks counted as missed when coalescing (the count saturates there).
const MAX_MISSED_COUNTED: i64 = 100_000;
/// Most schedules one [`tick_due`] call advances.
const MAX_PER_CALL: usize = 1000;

/// A parsed cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expression: String,
    timezone: chrono_tz::Tz,
    cron: croner::Cron,
}

impl CronSchedule {
    /// Parse `expression` (5 fields, or 6 with seconds first; `@daily` and the like) in the IANA
    /// zone `timezone`.
    pub fn parse(expression: &str, timezone: &str) -> Result<Self> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| Error::InvalidInput(format!("cron expression {expression:?}: {e}")))?;
        let timezone = chrono_tz::Tz::from_str(timezone)
            .map_err(|e| Error::InvalidInput(format!("time zone {timezone:?}: {e}")))?;
        Ok(CronSchedule { expression: expression.to_owned(), timezone, cron })
    }

    /// The expression.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The time zone's name.
    pub fn timezone(&self) -> &str {
        self.timezone.name()
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let local = t.with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&local, false)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|e| Error::InvalidInput(format!("cron expression {:?}: no next tick: {e}", self.expression)))
    }

    /// The ticks in `[from, now]`: the latest, and how many came before it (saturating).
    fn due(&self, from: DateTime<Utc>, now: DateTime<Utc>) -> Result<(DateTime<Utc>, i64)> {
        let mut latest = from;
        let mut earlier = 0;
        loop {
            let next = self.next_after(latest)?;
            if next > now {
                return Ok((latest, earlier));
            }
            if earlier >= MAX_MISSED_COUNTED {
                // Too many to count one by one: jump to the last one.
                let last = self
                    .cron
                    .find_previous_occurrence(&now.with_timezone(&self.timezone), true)
                    .map(|d| d.with_timezone(&Utc))
                    .unwrap_or(next);
                return Ok((last.max(latest), earlier));
            }
            latest = next;
            earlier += 1;
        }
    }
}

/// Create or update a schedule (see [`register_functions`](crate::function::register_functions)).
pub(crate) async fn upsert_schedule(
    conn: &mut PgConnection,
    function: &str,
    schedule: &CronSchedule,
    queue: &str,
    max_attempts: i32,
    now: DateTime<Utc>,
) -> Result<()> {
    let next = schedule.next_after(now)?;
    crate::pooler::query(
        "INSERT INTO oncely.schedules AS s (function, cron, timezone, queue, max_attempts, next_tick) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (function) DO UPDATE SET \
             next_tick = CASE WHEN (s.cron, s.timezone) IS DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone) \
                              THEN EXCLUDED.next_tick ELSE s.next_tick END, \
             cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, queue = EXCLUDED.queue, \
             max_attempts = EXCLUDED.max_attempts, updated_at = now()",
    )
    .bind(function)
    .bind(schedule.expression())
    .bind(schedule.timezone())
    .bind(queue)
    .bind(max_attempts)
    .bind(next)
    .execute(conn)
    .await?;
    Ok(())
}

/// One run [`tick_due`] enqueued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickRun {
    /// The function.
    pub function: String,
    /// The tick.
    pub tick: Tick,
    /// The run's job.
    pub job_id: JobId,
}

/// Enqueue the run of every schedule due at `now` (`None`: the database clock) and advance it,
/// one schedule per transaction, skipping schedules another worker is ticking. Safe to call from
/// every worker at once; see the [module docs](self) for the guarantees and the missed-tick policy.
pub async fn tick_due(pool: &PgPool, now: Option<DateTime<Utc>>) -> Result<Vec<TickRun>> {
    let mut runs = Vec::new();
    for _ in 0..MAX_PER_CALL {
        // Never cancel `begin` (see DESIGN.md); this future is only dropped between statements.
        let mut tx = crate::txn::begin(pool).await?;
        let row = crate::pooler::query(
            "SELECT function, cron, timezone, queue, max_attempts, next_tick, coalesce($1, now()) AS now \
             FROM oncely.schedules WHERE next_tick <= coalesce($1, now()) \
             ORDER BY next_tick LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            break;
        };
        let function: String = row.try_get("function")?;
        let cron: String = row.try_get("cron")?;
        let timezone: String = row.try_get("timezone")?;
        let next_tick: DateTime<Utc> = row.try_get("next_tick")?;
        let at: DateTime<Utc> = row.try_get("now")?;
        let schedule = CronSchedule::parse(&cron, &timezone)?;
        let (latest, missed) = schedule.due(next_tick, at)?;
        let tick = Tick { at: latest, cron, timezone, missed };
        let args = serde_json::json!({ "trigger": { "cron": tick } });
        let unique_key = format!("cron:{function}:{}", latest.format("%Y-%m-%dT%H:%M:%SZ"));
        let job_id: i64 = crate::pooler::query_scalar(concat!(
            "INSERT INTO oncely.jobs (kind, queue, args, max_attempts, unique_key) VALUES ($1, $2, $3, $4, $5) ",
            job_on_unique_conflict!(),
            "RETURNING id, pg_notify(",
            jobs_channel!(),
            ", queue) IS NULL AS notified"
        ))
        .bind(&function)
        .bind(row.try_get::<String, _>("queue")?)
        .bind(&args)
        .bind(row.try_get::<i32, _>("max_attempts")?)
        .bind(&unique_key)
        .fetch_one(&mut *tx)
        .await?;
        let next = schedule.next_after(at)?;
        crate::pooler::query(
            "UPDATE oncely.schedules SET next_tick = $2, last_tick = $3, updated_at = now() WHERE function = $1",
        )
        .bind(&function)
        .bind(next)
        .bind(latest)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if missed > 0 {
            tracing::warn!(function = %function, tick = %latest, missed, "cron ticks missed while no worker ran: one run stands for them");
        }
        tracing::debug!(function = %function, tick = %latest, job.id = job_id, "cron tick enqueued");
        runs.push(TickRun { function, tick, job_id: JobId(job_id) });
    }
    Ok(runs)
}

/// Delete up to `limit` expired event idempotency keys (maintenance). Returns how many.
pub async fn prune_event_keys<'e>(executor: impl sqlx::PgExecutor<'e>, limit: i64) -> Result<u64> {
    let res = crate::pooler::query(
        "DELETE FROM oncely.event_keys WHERE key IN \
         (SELECT key FROM oncely.event_keys WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(limit)
    .execute(executor)
    .await?;
    Ok(res.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn next_ticks_follow_the_time_zone() {
        let s = CronSchedule::parse("0 2 * * *", "Europe/Paris").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
        // 02:00 in Paris (UTC+1 in winter) is 01:00 UTC.
        assert_eq!(s.next_after(t).unwrap(), Utc.with_ymd_and_hms(2026, 12, 1, 1, 0, 0).unwrap());
        let every_minute = CronSchedule::parse("* * * * *", "UTC").unwrap();
        assert_eq!(every_minute.next_after(t).unwrap(), Utc.with_ymd_and_hms(2026, 11, 30, 12, 1, 0).unwrap());
        let seconds = CronSchedule::parse("*/10 * * * * *", "UTC").unwrap();
        assert_eq!(seconds.next_after(t).unwrap(), Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 10).unwrap());
    }

    #[test]
    fn missed_ticks_coalesce_into_the_latest() {
        let s = CronSchedule::parse("* * * * *", "UTC").unwrap();
        let from = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
        assert_eq!(s.due(from, from).unwrap(), (from, 0));
        let now = Utc.with_ymd_and_hms(2026, 11, 30, 12, 10, 30).unwrap();
        assert_eq!(s.due(from, now).unwrap(), (Utc.with_ymd_and_hms(2026, 11, 30, 12, 10, 0).unwrap(), 10));
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        assert!(CronSchedule::parse("61 * * * *", "UTC").is_err());
        assert!(CronSchedule::parse("* * * * *", "Nowhere/City").is_err());
    }
}
