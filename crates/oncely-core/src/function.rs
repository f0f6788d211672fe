//! Functions: handlers started by an event or by a cron schedule (the Inngest model, transactional).
//!
//! A [`Function`] has a name (its runs are jobs of that kind), event [subscriptions](Function::on_event)
//! and/or a [cron schedule](Function::cron). Workers store their functions' definitions at start
//! ([`register_functions`]), so a process that only publishes still fans out:
//! [`publish`](crate::outbox::publish) inserts, in the statement that stores the event, one run per
//! matching subscription. A run exists if and only if the publishing transaction commits.
//!
//! A run is an ordinary job whose arguments are [`RunArgs`]: its trigger (the event, or the cron
//! tick). Its steps are ordinary ledger steps (`job:{run id}:{step}`), so every step keeps its
//! exactly-once guarantee, and [`run_history`] reads them back.
//!
//! What is not promised: subscriptions are not retroactive. An event published before any worker
//! stored a function's subscription (or after it was removed) starts no run of it, as an endpoint
//! created after an event does not receive it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};

use crate::error::{Error, Result};
use crate::job::{JobId, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE};
use crate::outbox::EventId;
use crate::schedule::CronSchedule;

/// A function's definition: its name (the kind of its runs), what triggers it, and where its runs go.
///
/// # Example
///
/// ```
/// use oncely_core::function::{EventFilter, Function};
/// let generate = Function::new("generate-report")
///     .on_event("report.requested")
///     .on_event_where("billing.*", EventFilter::new().eq("plan", "pro"))
///     .queue("reports");
/// let settle = Function::new("settle-usage").cron("0 2 * * *", "Europe/Paris");
/// assert!(generate.validate().is_ok() && settle.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    name: String,
    subscriptions: Vec<Subscription>,
    schedule: Option<(String, String)>,
    queue: String,
    max_attempts: i32,
    cancel_on: Vec<CancelOn>,
}

/// A cancellation rule of a function ([`Function::cancel_on`]): an event on `topic` whose payload
/// field `event_field` equals the run's trigger payload field `trigger_field` cancels the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelOn {
    /// The cancelling topic (exact).
    pub topic: String,
    /// The field of the cancelling event's payload (dotted path).
    pub event_field: String,
    /// The field of the run's trigger event payload (dotted path).
    pub trigger_field: String,
}

/// One event subscription of a function.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// An exact topic, or a prefix pattern ending in `*` (`report.*`; `*` alone: every topic but
    /// the operational `oncely.` ones).
    pub pattern: String,
    /// A JSON containment the payload must satisfy (`payload @> filter`); `None`: every payload.
    pub filter: Option<serde_json::Value>,
}

/// A payload filter: JSON containment, built from field equalities or given whole.
///
/// `eq("customer.plan", "pro")` means `payload.customer.plan == "pro"`; several conditions must all
/// hold. Containment is PostgreSQL's `@>`: an array in the filter matches an array containing its
/// elements.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter(serde_json::Map<String, serde_json::Value>);

impl EventFilter {
    /// A filter that matches every payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload must contain `json` (`payload @> json`); `json` must be an object.
    pub fn contains(json: serde_json::Value) -> Result<Self> {
        match json {
            serde_json::Value::Object(map) => Ok(Self(map)),
            other => Err(Error::InvalidInput(format!("an event filter must be a JSON object, got {other}"))),
        }
    }

    /// The field at the dotted `path` must equal `value`.
    pub fn eq(mut self, path: &str, value: impl Into<serde_json::Value>) -> Self {
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut map = &mut self.0;
        for part in parts {
            let entry = map.entry(part.to_owned()).or_insert_with(|| serde_json::Value::Object(Default::default()));
            if !entry.is_object() {
                *entry = serde_json::Value::Object(Default::default());
            }
            map = entry.as_object_mut().expect("just made an object");
        }
        map.insert(last.to_owned(), value.into());
        self
    }

    fn into_json(self) -> Option<serde_json::Value> {
        (!self.0.is_empty()).then_some(serde_json::Value::Object(self.0))
    }
}

impl Function {
    /// A function named `name`: its runs are jobs of kind `name`, on [`DEFAULT_QUEUE`] with
    /// [`DEFAULT_MAX_ATTEMPTS`] unless set.
    pub fn new(name: impl Into<String>) -> Self {
        Function {
            name: name.into(),
            subscriptions: Vec::new(),
            schedule: None,
            queue: DEFAULT_QUEUE.to_owned(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            cancel_on: Vec::new(),
        }
    }

    /// Cancel a run when an event on `topic` is published whose payload field `field` (dotted path)
    /// equals the same field of the run's trigger event (e.g. `user.deleted` with the same
    /// `user_id`): Inngest's `cancelOn`. Counted: events published after the run was created. A run
    /// not running is cancelled by the publishing statement; a running one stops at its next step
    /// boundary. Its state is then `cancelled`, and its error history names the event.
    pub fn cancel_on(self, topic: impl Into<String>, field: impl Into<String>) -> Self {
        let field = field.into();
        self.cancel_on_fields(topic, field.clone(), field)
    }

    /// [`cancel_on`](Self::cancel_on) with different fields: the cancelling event's `event_field`
    /// must equal the trigger's `trigger_field`.
    pub fn cancel_on_fields(
        mut self,
        topic: impl Into<String>,
        event_field: impl Into<String>,
        trigger_field: impl Into<String>,
    ) -> Self {
        self.cancel_on.push(CancelOn {
            topic: topic.into(),
            event_field: event_field.into(),
            trigger_field: trigger_field.into(),
        });
        self
    }

    /// Its cancellation rules.
    pub fn cancel_rules(&self) -> &[CancelOn] {
        &self.cancel_on
    }

    /// Run on every event whose topic is `pattern` (or starts with its prefix, for `prefix.*`).
    pub fn on_event(self, pattern: impl Into<String>) -> Self {
        self.on_event_where(pattern, EventFilter::new())
    }

    /// Run on events matching `pattern` whose payload passes `filter`.
    pub fn on_event_where(mut self, pattern: impl Into<String>, filter: EventFilter) -> Self {
        self.subscriptions.push(Subscription { pattern: pattern.into(), filter: filter.into_json() });
        self
    }

    /// Run on a cron schedule (5 fields, or 6 with seconds first; `@daily` and the like) in the IANA
    /// time zone `timezone` (e.g. `"UTC"`, `"Europe/Paris"`). See [`schedule`](crate::schedule) for
    /// what one run per tick means and what happens to ticks missed while no worker ran.
    pub fn cron(mut self, expression: impl Into<String>, timezone: impl Into<String>) -> Self {
        self.schedule = Some((expression.into(), timezone.into()));
        self
    }

    /// The queue of its runs. Defaults to [`DEFAULT_QUEUE`].
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Attempts per run. Defaults to [`DEFAULT_MAX_ATTEMPTS`].
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The name (the kind of its runs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue of its runs.
    pub fn queue_name(&self) -> &str {
        &self.queue
    }

    /// Its event subscriptions.
    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    /// Its cron schedule, parsed.
    pub fn schedule(&self) -> Result<Option<CronSchedule>> {
        self.schedule.as_ref().map(|(expr, tz)| CronSchedule::parse(expr, tz)).transpose()
    }

    /// Check the definition: a valid name, patterns, cron expression and time zone, at least one
    /// trigger.
    pub fn validate(&self) -> Result<()> {
        crate::job::check_len("function name", &self.name, crate::outbox::MAX_TOPIC_LEN)?;
        crate::job::check_delivery(&self.queue, self.max_attempts)?;
        if self.subscriptions.is_empty() && self.schedule.is_none() {
            return Err(Error::InvalidInput(format!("function `{}` has no trigger (on_event or cron)", self.name)));
        }
        for s in &self.subscriptions {
            split_pattern(&s.pattern)?;
        }
        for c in &self.cancel_on {
            crate::outbox::validate_topic(&c.topic)?;
            if c.topic.contains('*') || c.event_field.is_empty() || c.trigger_field.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "function `{}`: cancel_on needs an exact topic and fields, got {c:?}",
                    self.name
                )));
            }
        }
        self.schedule()?;
        Ok(())
    }
}

/// `(topic, prefix)`: an exact topic, or the prefix of a `prefix.*` pattern.
fn split_pattern(pattern: &str) -> Result<(Option<&str>, Option<&str>)> {
    if let Some(prefix) = pattern.strip_suffix('*') {
        if !prefix.is_empty() {
            crate::outbox::validate_topic(prefix)?;
        }
        if prefix.contains('*') {
            return Err(Error::InvalidInput(format!("pattern {pattern:?}: `*` may only end a pattern")));
        }
        return Ok((None, Some(prefix)));
    }
    crate::outbox::validate_topic(pattern)?;
    if pattern.contains('*') {
        return Err(Error::InvalidInput(format!("pattern {pattern:?}: `*` may only end a pattern")));
    }
    Ok((Some(pattern), None))
}

/// Store the definitions of `functions` (a worker does it at start): their subscriptions replace
/// the stored ones of the same function names, and their schedules are created or updated. A
/// schedule whose expression or time zone changed restarts from the first tick after `now`; an
/// unchanged one keeps its next tick, so restarts neither skip nor repeat ticks. Functions not named
/// here are left alone (another worker may serve them).
///
/// During a rolling deploy that changes a function's triggers, old and new workers rewrite each
/// other's definition at their starts: the last one started wins.
pub async fn register_functions(conn: &mut PgConnection, functions: &[Function], now: DateTime<Utc>) -> Result<()> {
    for f in functions {
        f.validate()?;
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    match store_functions(&mut tx, functions, now).await {
        Ok(()) => Ok(tx.commit().await?),
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

async fn store_functions(tx: &mut PgConnection, functions: &[Function], now: DateTime<Utc>) -> Result<()> {
    for f in functions {
        let patterns: Vec<&str> = f.subscriptions.iter().map(|s| s.pattern.as_str()).collect();
        crate::pooler::query(
            "DELETE FROM oncely.function_subscriptions WHERE function = $1 AND NOT (pattern = ANY($2))",
        )
        .bind(&f.name)
        .bind(&patterns)
        .execute(&mut *tx)
        .await?;
        for s in &f.subscriptions {
            let (topic, prefix) = split_pattern(&s.pattern)?;
            crate::pooler::query(
                "INSERT INTO oncely.function_subscriptions (function, pattern, topic, topic_prefix, filter, queue, max_attempts) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (function, pattern) DO UPDATE SET topic = EXCLUDED.topic, topic_prefix = EXCLUDED.topic_prefix, \
                     filter = EXCLUDED.filter, queue = EXCLUDED.queue, max_attempts = EXCLUDED.max_attempts, updated_at = now()",
            )
            .bind(&f.name)
            .bind(&s.pattern)
            .bind(topic)
            .bind(prefix)
            .bind(&s.filter)
            .bind(&f.queue)
            .bind(f.max_attempts)
            .execute(&mut *tx)
            .await?;
        }
        match f.schedule()? {
            Some(schedule) => {
                crate::schedule::upsert_schedule(&mut *tx, &f.name, &schedule, &f.queue, f.max_attempts, now).await?
            }
            None => {
                crate::pooler::query("DELETE FROM oncely.schedules WHERE function = $1")
                    .bind(&f.name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    Ok(())
}

/// The arguments of every run: what triggered it. A run's job args are `{"trigger": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunArgs<T = serde_json::Value> {
    /// The trigger.
    pub trigger: Trigger<T>,
}

/// What started a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger<T = serde_json::Value> {
    /// A published event, its payload read as `T`.
    Event(TriggerEvent<T>),
    /// A cron tick.
    Cron(Tick),
}

impl<T> Trigger<T> {
    /// The event, for an event-triggered run.
    pub fn event(&self) -> Option<&TriggerEvent<T>> {
        match self {
            Trigger::Event(e) => Some(e),
            Trigger::Cron(_) => None,
        }
    }

    /// The tick, for a cron run.
    pub fn tick(&self) -> Option<&Tick> {
        match self {
            Trigger::Cron(t) => Some(t),
            Trigger::Event(_) => None,
        }
    }
}

/// The event that started a run, with its payload typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerEvent<T = serde_json::Value> {
    /// The event's id.
    pub id: EventId,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: T,
    /// Its idempotency key, if it had one.
    #[serde(default)]
    pub key: Option<String>,
    /// Its ordering key, if it had one.
    #[serde(default)]
    pub ordering_key: Option<String>,
    /// When it was published (the publishing transaction's start, database clock).
    pub published_at: DateTime<Utc>,
}

/// The cron tick that started a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// The tick's scheduled time.
    pub at: DateTime<Utc>,
    /// The cron expression.
    pub cron: String,
    /// Its time zone.
    pub timezone: String,
    /// Earlier ticks that were due but got no run of their own (every worker was down); this run
    /// stands for them (see [`schedule`](crate::schedule)).
    #[serde(default)]
    pub missed: i64,
}

/// A run in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The run's job id.
    pub id: JobId,
    /// The function.
    pub function: String,
    /// The job state.
    pub state: String,
    /// Attempts so far.
    pub attempt: i32,
    /// What started it.
    pub trigger: Trigger,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When it finished, if it did.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One step of a run, from the effect ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// The step's name (its ledger key without `job:{id}:`), or its business key.
    pub name: String,
    /// True for a step with a business key (not keyed by the run; never invalidated by a re-run).
    pub business_key: bool,
    /// `in_progress` or `completed`.
    pub state: String,
    /// When it was first claimed.
    pub started_at: DateTime<Utc>,
    /// Until its last write (its record, for a completed step).
    pub duration: chrono::Duration,
    /// The run attempt that holds (or recorded) it.
    pub attempt: Option<i32>,
    /// Its recorded output.
    pub output: Option<serde_json::Value>,
    /// The last error of the run that names this step, if any.
    pub error: Option<String>,
}

/// A run with its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RunDetail {
    /// The run.
    pub run: RunSummary,
    /// Its steps, in the order they were first claimed.
    pub steps: Vec<StepRecord>,
    /// Every failed attempt's error, oldest first.
    pub errors: Vec<crate::job::AttemptError>,
    /// Its waits for events (`wait_for_event`) and cancellation registrations (`cancel_on`),
    /// oldest first. Sleeps are steps whose output is `{"sleep_until": …}`.
    pub waits: Vec<crate::wait::WaitRecord>,
    /// Its child runs (`ctx.invoke`, `ctx.invoke_all`), oldest first: id, state, step.
    pub children: Vec<crate::child::ChildRecord>,
}

const RUN_COLUMNS: &str = "id, kind, state, attempt, args, created_at, finished_at";
/// Which jobs are runs: their args carry an event or cron trigger (an ordinary job whose args
/// happen to have a `trigger` field of another shape is not one).
const IS_RUN: &str = "(args -> 'trigger' ? 'event' OR args -> 'trigger' ? 'cron')";

fn run_from_row(row: &sqlx::postgres::PgRow) -> Result<RunSummary> {
    let args: serde_json::Value = row.try_get("args")?;
    let id = JobId(row.try_get("id")?);
    let run: RunArgs =
        serde_json::from_value(args).map_err(|source| Error::InvalidArgs { kind: format!("run {id}"), source })?;
    Ok(RunSummary {
        id,
        function: row.try_get("kind")?,
        state: row.try_get("state")?,
        attempt: row.try_get("attempt")?,
        trigger: run.trigger,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// The newest runs (jobs with a trigger), optionally of one function. Reads the jobs table without
/// an index on the trigger: for operators and the dashboard, not for a hot path.
pub async fn list_runs<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    function: Option<&str>,
    limit: i64,
) -> Result<Vec<RunSummary>> {
    let rows = crate::pooler::query(&format!(
        "SELECT {RUN_COLUMNS} FROM oncely.jobs WHERE {IS_RUN} AND ($1::text IS NULL OR kind = $1) \
         ORDER BY id DESC LIMIT $2"
    ))
    .bind(function)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    rows.iter().map(run_from_row).collect()
}

/// One run with its steps (from the effect ledger) and errors: steps keyed by the run
/// (`job:{id}:…`), and business-key steps last claimed by one of its attempts.
pub async fn run_history(conn: &mut PgConnection, id: JobId) -> Result<RunDetail> {
    let row =
        crate::pooler::query(&format!("SELECT {RUN_COLUMNS}, errors FROM oncely.jobs WHERE id = $1 AND {IS_RUN}"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(Error::NotFound { what: "run", id: id.0 })?;
    let run = run_from_row(&row)?;
    let errors: Vec<crate::job::AttemptError> = serde_json::from_value(row.try_get("errors")?)
        .map_err(|source| Error::InvalidArgs { kind: format!("run {id} errors"), source })?;
    let prefix = format!("job:{id}:");
    let rows = crate::pooler::query(
        "SELECT key, state, created_at, updated_at, owner, output FROM oncely.ledger \
         WHERE namespace = $1 AND (starts_with(key, $2) OR starts_with(owner, $2)) ORDER BY created_at, key",
    )
    .bind(crate::step::STEP_NAMESPACE)
    .bind(&prefix)
    .fetch_all(&mut *conn)
    .await?;
    let mut steps = Vec::with_capacity(rows.len());
    for r in rows {
        let key: String = r.try_get("key")?;
        let owner: String = r.try_get("owner")?;
        let created: DateTime<Utc> = r.try_get("created_at")?;
        let updated: DateTime<Utc> = r.try_get("updated_at")?;
        let (name, business_key) = match key.strip_prefix(&prefix) {
            Some(name) => (name.to_owned(), false),
            None => (key.clone(), true),
        };
        let needle = format!("step `{name}`");
        let error = errors.iter().rev().find(|e| e.message.contains(&needle)).map(|e| e.message.clone());
        steps.push(StepRecord {
            attempt: owner.strip_prefix(&prefix).and_then(|a| a.parse().ok()),
            name,
            business_key,
            state: r.try_get("state")?,
            started_at: created,
            duration: updated - created,
            output: r.try_get("output")?,
            error,
        });
    }
    let waits = crate::wait::run_waits(&mut *conn, id).await?;
    let children = crate::child::run_children(&mut *conn, id).await?;
    Ok(RunDetail { run, steps, errors, waits, children })
}

/// What [`rerun_from_step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rerun {
    /// The steps whose records were deleted, in order (the named step first).
    pub invalidated: Vec<String>,
}

/// Re-run a finished (completed, dead or cancelled) run from its step `step`: the records of that
/// step and of every run-keyed step first claimed after it are deleted, and the run goes back to
/// its queue with one more attempt allowed. Steps before it return their recorded outputs; it and
/// the later ones run again.
///
/// Business-key steps (a [`Step::key`](crate::step::Step::key)) are never invalidated: their record
/// is shared with other jobs and keeps their effect exactly once, so on the re-run they return their
/// recorded output. Only steps keyed by this run (`job:{id}:…`) are deleted.
pub async fn rerun_from_step(conn: &mut PgConnection, id: JobId, step: &str) -> Result<Rerun> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    match rerun_in(&mut tx, id, step).await {
        Ok(rerun) => {
            tx.commit().await?;
            tracing::info!(job.id = %id, step, invalidated = rerun.invalidated.len(), "run re-queued from a step");
            Ok(rerun)
        }
        Err(e) => {
            // Now, not when the connection is next used: the run's row lock would keep workers off it.
            tx.rollback().await?;
            Err(e)
        }
    }
}

async fn rerun_in(tx: &mut PgConnection, id: JobId, step: &str) -> Result<Rerun> {
    let state: Option<String> =
        crate::pooler::query_scalar(&format!("SELECT state FROM oncely.jobs WHERE id = $1 AND {IS_RUN} FOR UPDATE"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let state = state.ok_or(Error::NotFound { what: "run", id: id.0 })?;
    if !matches!(state.as_str(), "completed" | "dead" | "cancelled") {
        return Err(Error::InvalidState {
            job_id: id,
            state,
            action: "re-run",
            expected: "completed, dead or cancelled",
        });
    }
    let prefix = format!("job:{id}:");
    let key = format!("{prefix}{step}");
    let rows = crate::pooler::query(
        "DELETE FROM oncely.ledger WHERE namespace = $1 AND starts_with(key, $2) AND created_at >= \
             (SELECT created_at FROM oncely.ledger WHERE namespace = $1 AND key = $3) \
         RETURNING key, created_at",
    )
    .bind(crate::step::STEP_NAMESPACE)
    .bind(&prefix)
    .bind(&key)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Err(Error::InvalidInput(format!(
            "run {id} has no recorded step `{step}` (business-key steps cannot be re-run)"
        )));
    }
    let mut invalidated: Vec<(DateTime<Utc>, String)> = rows
        .iter()
        .map(|r| Ok((r.try_get("created_at")?, r.try_get::<String, _>("key")?[prefix.len()..].to_owned())))
        .collect::<Result<_>>()?;
    invalidated.sort();
    let steps: Vec<&str> = invalidated.iter().map(|(_, k)| k.as_str()).collect();
    // An invalidated invoke step starts new children when it runs again: forget the old ones.
    crate::pooler::query("DELETE FROM oncely.child_runs WHERE parent_id = $1 AND step = ANY($2)")
        .bind(id)
        .bind(&steps)
        .execute(&mut *tx)
        .await?;
    crate::pooler::query(
        "UPDATE oncely.jobs SET state = 'available', run_at = now(), finished_at = NULL, \
             max_attempts = greatest(max_attempts, attempt + 1), lease_expires_at = NULL, worker_id = NULL \
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Error::InvalidInput(format!("run {id} cannot be re-run: another live job holds its unique key"))
        }
        e => e.into(),
    })?;
    crate::pooler::query(concat!("SELECT pg_notify(", jobs_channel!(), ", queue) FROM oncely.jobs WHERE id = $1"))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(Rerun { invalidated: invalidated.into_iter().map(|(_, k)| k).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_nest_dotted_paths() {
        let f = EventFilter::new().eq("customer.plan", "pro").eq("customer.id", 7).eq("kind", "x");
        assert_eq!(f.into_json(), Some(serde_json::json!({"customer": {"plan": "pro", "id": 7}, "kind": "x"})));
        assert_eq!(EventFilter::new().into_json(), None);
        assert!(EventFilter::contains(serde_json::json!([1])).is_err());
    }

    #[test]
    fn patterns_are_exact_or_prefix() {
        assert_eq!(split_pattern("report.ready").unwrap(), (Some("report.ready"), None));
        assert_eq!(split_pattern("report.*").unwrap(), (None, Some("report.")));
        assert_eq!(split_pattern("*").unwrap(), (None, Some("")));
        for bad in ["", "a*b", "*.x*", "has space"] {
            assert!(split_pattern(bad).is_err(), "{bad:?}");
        }
        assert!(Function::new("f").validate().is_err(), "no trigger");
        assert!(Function::new("f").cron("not cron", "UTC").validate().is_err());
        assert!(Function::new("f").cron("* * * * *", "Mars/Olympus").validate().is_err());
    }

    #[test]
    fn run_args_read_back_typed() {
        let json = serde_json::json!({"trigger": {"event": {"id": 3, "topic": "t", "payload": {"n": 1},
            "key": null, "ordering_key": null, "published_at": "2026-11-30T18:00:00.123+00:00"}}});
        #[derive(Debug, Deserialize, PartialEq)]
        struct P {
            n: i32,
        }
        let args: RunArgs<P> = serde_json::from_value(json).unwrap();
        assert_eq!(args.trigger.event().unwrap().payload, P { n: 1 });
    }
}
