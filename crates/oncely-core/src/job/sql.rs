//! The job's SQL: every statement that writes `oncely.jobs`, in one place, named entity-first.
//!
//! Every statement that changes a running job is fenced by `id`, `attempt` and `state = 'running'`.
//! The only writes of `oncely.jobs` elsewhere are parts of another entity's single statement, so
//! that its rows and its jobs commit as one: the outbox's fan-out and the inbox insert new jobs
//! with their events (using this module's `job_insert_returning!` and `jobs_channel!`), and a
//! delivery record moves its ordered successor's job (`run_at`, never a running job's state).
//! The ledger's statements are in `crate::ledger::sql`, the leader election's in
//! `crate::maintenance`.
//!
//! # Plans that cannot flip
//!
//! The hot statements are written so that PostgreSQL has one sensible plan whatever its statistics
//! say (fresh, analyzed while empty, analyzed while full, or a generic plan of a prepared
//! statement). Two shapes do it:
//!
//! - **Lock by id, then check the fence on the locked row.** A `MATERIALIZED` CTE selects the rows
//!   by primary key only (`WHERE id = $1`, or one lookup per claimed id) with `FOR UPDATE`, and the
//!   fence (`attempt`, `state = 'running'`) is tested on what it returns: the newest version of a
//!   row this statement now holds, so no one can change it before commit. A fence written on the
//!   table itself (`... AND state = 'running'`) lets the planner scan the partial index
//!   `jobs_lease_idx` instead of the primary key, and it does when the statistics say no job is
//!   running (analyzed right after an enqueue): then every completion batch joined every running
//!   job against every claim.
//! - **Update by `id = ANY (ARRAY(SELECT id FROM the_cte))`**, an init plan evaluated once: the
//!   update's scan is a primary-key lookup and there is no join for the planner to reorder.
//!
//! **Lock order.** The batched statements lock their rows in ascending `id` order (the claims are
//! sorted before the lookups), so two batches over overlapping jobs — the heartbeat's and the
//! completer's — queue behind each other instead of deadlocking. Claims and rescues use `SKIP
//! LOCKED`, which never waits.
//!
//! `tests/it/plans.rs` checks the plans of these statements under several sets of statistics.

/// Columns of a job row, in `SELECT` lists.
pub(crate) const JOB_COLUMNS: &str = "id, kind, queue, args, priority, state, attempt, max_attempts, \
    snoozes, run_at, created_at, attempted_at, finished_at, lease_expires_at, worker_id, unique_key, errors, \
    traceparent";

/// The channel every statement that makes work available notifies, with the queue name as payload.
pub const JOBS_CHANNEL: &str = "oncely_jobs";

/// [`JOBS_CHANNEL`] as an SQL literal, for statements built with `concat!`.
macro_rules! jobs_channel {
    () => {
        "'oncely_jobs'"
    };
}

/// The RETURNING list of every insert: `id`, `existing`, and a NOTIFY on the job's queue when it
/// is new and due now (PostgreSQL folds identical notifications of one transaction into one).
macro_rules! job_insert_returning {
    ($existing:literal) => {
        concat!(
            "RETURNING id, ",
            $existing,
            " AS existing, ",
            "CASE WHEN run_at <= now() AND NOT ",
            $existing,
            " THEN pg_notify(",
            jobs_channel!(),
            ", queue) END IS NULL AS notified"
        )
    };
}

/// The columns and rows of a batch insert from parallel arrays.
macro_rules! job_insert_many_head {
    () => {
        r#"
INSERT INTO oncely.jobs (kind, queue, args, priority, run_at, max_attempts, unique_key, traceparent)
SELECT kind, queue, args, priority,
       coalesce(run_at, now() + make_interval(secs => coalesce(delay_secs, 0))),
       max_attempts, unique_key, traceparent
FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[], $5::timestamptz[], $6::float8[], $7::int[], $8::text[],
            $9::text[])
     AS t(kind, queue, args, priority, run_at, delay_secs, max_attempts, unique_key, traceparent)
"#
    };
}

/// The ON CONFLICT clause for unique keys: with a key a live job already holds, the existing job
/// is returned (`existing = true`) instead. `DO UPDATE` (a no-op write) locks and returns the
/// conflicting row even when it committed after this statement's snapshot, which `DO NOTHING`
/// cannot.
macro_rules! job_on_unique_conflict {
    () => {
        "ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('available', 'running')
DO UPDATE SET unique_key = EXCLUDED.unique_key
"
    };
}

/// Insert many jobs without unique keys.
pub(crate) const JOB_INSERT_MANY: &str = concat!(job_insert_many_head!(), job_insert_returning!("false"));

/// Insert many jobs, some with unique keys.
pub(crate) const JOB_INSERT_MANY_UNIQUE: &str =
    concat!(job_insert_many_head!(), job_on_unique_conflict!(), job_insert_returning!("(xmax::text <> '0')"));

macro_rules! job_insert_one_head {
    () => {
        r#"
INSERT INTO oncely.jobs (kind, queue, args, priority, run_at, max_attempts, unique_key, traceparent)
VALUES ($1, $2, $3, $4, coalesce($5, now() + make_interval(secs => coalesce($6, 0))), $7, $8, $9)
"#
    };
}

/// Insert one job without a unique key.
pub(crate) const JOB_INSERT_ONE: &str = concat!(job_insert_one_head!(), job_insert_returning!("false"));

/// Insert one job with a unique key.
pub(crate) const JOB_INSERT_ONE_UNIQUE: &str =
    concat!(job_insert_one_head!(), job_on_unique_conflict!(), job_insert_returning!("(xmax::text <> '0')"));

/// Insert many jobs, some with concurrency keys (`$10`, limits `$11`) and perhaps unique keys.
pub(crate) const JOB_INSERT_MANY_FLOW: &str = concat!(
    r#"
INSERT INTO oncely.jobs (kind, queue, args, priority, run_at, max_attempts, unique_key, traceparent, flow_key, flow_limit)
SELECT kind, queue, args, priority,
       coalesce(run_at, now() + make_interval(secs => coalesce(delay_secs, 0))),
       max_attempts, unique_key, traceparent, flow_key, flow_limit
FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::smallint[], $5::timestamptz[], $6::float8[], $7::int[], $8::text[],
            $9::text[], $10::text[], $11::int[])
     AS t(kind, queue, args, priority, run_at, delay_secs, max_attempts, unique_key, traceparent, flow_key, flow_limit)
"#,
    job_on_unique_conflict!(),
    job_insert_returning!("(xmax::text <> '0')")
);

/// Insert one job with a concurrency key (`$10`, limit `$11`), perhaps a unique key.
pub(crate) const JOB_INSERT_ONE_FLOW: &str = concat!(
    r#"
INSERT INTO oncely.jobs (kind, queue, args, priority, run_at, max_attempts, unique_key, traceparent, flow_key, flow_limit)
VALUES ($1, $2, $3, $4, coalesce($5, now() + make_interval(secs => coalesce($6, 0))), $7, $8, $9, $10, $11)
"#,
    job_on_unique_conflict!(),
    job_insert_returning!("(xmax::text <> '0')")
);

/// Reserve `$1` job ids (for a COPY batch).
pub(crate) const JOB_RESERVE_IDS: &str =
    "SELECT nextval(pg_get_serial_sequence('oncely.jobs', 'id')) FROM generate_series(1, $1)";

/// COPY a batch of due jobs with reserved ids (text format; see `queue::copy_row`).
pub(crate) const JOB_COPY_IN: &str =
    "COPY oncely.jobs (id, kind, queue, args, priority, max_attempts, traceparent) FROM STDIN";

/// Make a claim's commit durable even where the session commits asynchronously: a one-time
/// condition (evaluated once per statement) that sets `synchronous_commit` to `on` for the claim's
/// own transaction when it is `off`, and leaves every other value (`local`, `remote_write`,
/// `remote_apply`, `on`) as it is.
///
/// Why: a claim lost in a database crash puts its job back at the previous attempt number, and the
/// next claim hands the same number out again; the attempt is the fencing token, so the worker that
/// started the job before the crash could then complete or extend the second worker's claim.
/// `docs/operations.md`, "Durability settings".
macro_rules! claim_commit_durable {
    () => {
        "(SELECT current_setting('synchronous_commit') <> 'off' OR set_config('synchronous_commit', 'on', true) = 'on')"
    };
}
pub(crate) use claim_commit_durable;

/// The end of both claims: lease the ids of the CTE `next` to worker `$4` for `$3` seconds.
macro_rules! job_claim_update {
    () => {
        concat!(
            r#"
UPDATE oncely.jobs AS j
SET state = 'running', attempt = j.attempt + 1, attempted_at = clock_timestamp(),
    lease_expires_at = now() + make_interval(secs => $3), worker_id = $4
WHERE j.id = ANY (ARRAY(SELECT id FROM next))
  AND "#,
            claim_commit_durable!(),
            r#"
RETURNING j.id, j.kind, j.queue, j.args, j.priority, j.state, j.attempt, j.max_attempts, j.snoozes,
          j.run_at, j.created_at, j.attempted_at, j.finished_at, j.lease_expires_at, j.worker_id,
          j.unique_key, j.errors, j.traceparent
"#
        )
    };
}

/// Claim up to `$2` due jobs of queue `$1` (skipping paused queues and kinds), highest priority
/// first, then oldest `run_at`: lease them to worker `$4` for `$3` seconds. Only jobs without a
/// concurrency key, and nothing from a queue with a global limit unless `$5` (see `flow.rs`).
///
/// The scan walks the queue's priorities one by one (a loose index scan over `jobs_fetch_idx`:
/// each step is one probe for the next lower priority present), and within one priority reads
/// `run_at <= now()` as a range of the index, so it stops at the first job not yet due. Ordering by
/// `priority DESC, run_at` over the whole queue at once could not: with `priority` between `queue`
/// and `run_at` in the index, `run_at <= now()` was only a filter, and a claim that found fewer due
/// jobs than `$2` read every job scheduled for later (11 ms per claim with 100,000 scheduled; see
/// docs/benchmarks.md, "Scale").
pub(crate) const JOB_CLAIM: &str = concat!(
    r#"
WITH RECURSIVE priorities AS (
    (SELECT priority FROM oncely.jobs WHERE state = 'available' AND flow_key IS NULL AND queue = $1
     ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT j.priority FROM oncely.jobs AS j
            WHERE j.state = 'available' AND j.flow_key IS NULL AND j.queue = $1 AND j.priority < p.priority
            ORDER BY j.priority DESC LIMIT 1)
    FROM priorities AS p
    WHERE p.priority IS NOT NULL
), next AS MATERIALIZED (
    SELECT c.id
    FROM priorities AS p
    CROSS JOIN LATERAL (
        SELECT id FROM oncely.jobs
        WHERE state = 'available' AND flow_key IS NULL AND queue = $1 AND priority = p.priority AND run_at <= now()
          -- Pauses (`pause.rs`): two init plans over a tiny table, evaluated once per claim. The
          -- kind is compared as `kind || ''` so the planner cannot estimate it from the column's
          -- statistics: with few distinct kinds it took `kind <> ALL (unknown array)` to match no
          -- row and chose a sequential scan and sort of the whole queue (0.25 s per claim over
          -- 200k jobs).
          AND NOT EXISTS (SELECT 1 FROM oncely.pauses WHERE scope = 'queue' AND name = $1)
          AND (kind || '') <> ALL (ARRAY(SELECT name FROM oncely.pauses WHERE scope = 'kind'))
          -- A queue with a global limit (`flow.rs`) is claimed by the flow claim, which counts its
          -- running jobs under the limit's row lock; `$5` is true there.
          AND ($5 OR NOT EXISTS (SELECT 1 FROM oncely.queue_limits WHERE queue = $1))
        ORDER BY run_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE p.priority IS NOT NULL
    LIMIT $2
)
"#,
    job_claim_update!()
);

/// [`JOB_CLAIM`] within a window: for each priority in `$5` (highest first), only jobs with
/// `run_at >= ` the matching floor in `$6`, read as a range of `jobs_fetch_idx`. No `$5` flag: the
/// flow claim uses [`JOB_CLAIM`].
///
/// The index entries of jobs claimed since the oldest open snapshot began cannot be removed, or even
/// marked dead, until that snapshot ends (an idle-in-transaction session, a long report, a
/// repeatable-read reader). They sit at the head of each priority's range, and [`JOB_CLAIM`] starts
/// there: with a snapshot held for an hour at 800 jobs/s it would step over ~3 million entries and
/// their heap tuples on every claim. The floor skips them; `lease::ClaimWindow` keeps the floors and
/// runs [`JOB_CLAIM`] now and then to find what a window cannot see.
pub(crate) const JOB_CLAIM_WINDOWED: &str = concat!(
    r#"
WITH next AS MATERIALIZED (
    SELECT c.id
    FROM unnest($5::smallint[], $6::timestamptz[]) AS w(priority, floor)
    CROSS JOIN LATERAL (
        SELECT id FROM oncely.jobs
        WHERE state = 'available' AND flow_key IS NULL AND queue = $1 AND priority = w.priority
          AND run_at >= w.floor AND run_at <= now()
          -- As in JOB_CLAIM.
          AND NOT EXISTS (SELECT 1 FROM oncely.pauses WHERE scope = 'queue' AND name = $1)
          AND (kind || '') <> ALL (ARRAY(SELECT name FROM oncely.pauses WHERE scope = 'kind'))
          AND NOT EXISTS (SELECT 1 FROM oncely.queue_limits WHERE queue = $1)
        ORDER BY run_at, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS c
    LIMIT $2
)
"#,
    job_claim_update!()
);

/// Complete many claims at once (`$1` ids, `$2` attempts); returns the ids whose claim still held.
macro_rules! job_complete_many {
    () => {
        r#"
locked AS MATERIALIZED (
    SELECT j.id, j.attempt, j.state, c.attempt AS claimed
    FROM (SELECT id, attempt FROM unnest($1::bigint[], $2::int[]) AS u(id, attempt) ORDER BY id) AS c
    CROSS JOIN LATERAL (SELECT id, attempt, state FROM oncely.jobs WHERE id = c.id FOR UPDATE) AS j
), held AS (
    SELECT id FROM locked WHERE attempt = claimed AND state = 'running'
)
UPDATE oncely.jobs
SET state = 'completed', finished_at = now(), lease_expires_at = NULL
WHERE id = ANY (ARRAY(SELECT id FROM held))
RETURNING id, attempt
"#
    };
}

/// Complete many claims at once; returns the ids whose claim still held.
pub(crate) const JOB_SET_COMPLETED_IF_RUNNING_MANY: &str = concat!("WITH", job_complete_many!());

/// [`JOB_SET_COMPLETED_IF_RUNNING_MANY`], writing the attempts' deferred step records (`$3`–`$8`,
/// see `ledger::sql::ledger_record_many`) in the same statement. The records are written whether
/// or not the claim still held: they are results of work that was done, and a key that already has
/// a record keeps it.
pub(crate) const JOB_SET_COMPLETED_IF_RUNNING_MANY_RECORDING: &str = concat!(
    "WITH recorded AS (\n",
    crate::ledger::sql::ledger_record_many!("$3", "$4", "$5", "$6", "$7", "$8"),
    "\n),",
    job_complete_many!()
);

/// Extend the leases of many claims by `$3` seconds; returns the ids whose claim still held.
pub(crate) const JOB_EXTEND_LEASE_MANY: &str = r#"
WITH locked AS MATERIALIZED (
    SELECT j.id, j.attempt, j.state, c.attempt AS claimed
    FROM (SELECT id, attempt FROM unnest($1::bigint[], $2::int[]) AS u(id, attempt) ORDER BY id) AS c
    CROSS JOIN LATERAL (SELECT id, attempt, state FROM oncely.jobs WHERE id = c.id FOR UPDATE) AS j
), held AS (
    SELECT id FROM locked WHERE attempt = claimed AND state = 'running'
)
UPDATE oncely.jobs
SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = ANY (ARRAY(SELECT id FROM held))
RETURNING id, attempt
"#;

/// Record a failed attempt: back to `available` after `$4` seconds when `$3` (retryable) and
/// attempts remain, else `dead`. Returns the new state. Claims given back (snoozes, releases, lone
/// lease expiries: `snoozes`) do not count against `max_attempts`.
pub(crate) const JOB_SET_FAILED_IF_RUNNING: &str = r#"
WITH locked AS MATERIALIZED (
    SELECT id, attempt, state FROM oncely.jobs WHERE id = $1 FOR UPDATE
), held AS (
    SELECT id FROM locked WHERE attempt = $2 AND state = 'running'
)
UPDATE oncely.jobs
SET state = CASE WHEN $3 AND attempt - snoozes < max_attempts THEN 'available' ELSE 'dead' END,
    run_at = CASE WHEN $3 AND attempt - snoozes < max_attempts THEN now() + make_interval(secs => $4) ELSE run_at END,
    finished_at = CASE WHEN $3 AND attempt - snoozes < max_attempts THEN NULL ELSE now() END,
    lease_expires_at = NULL,
    errors = errors || jsonb_build_array(jsonb_build_object(
        'attempt', attempt, 'at', now(), 'kind', $5::text, 'message', $6::text))
WHERE id = (SELECT id FROM held)
RETURNING state
"#;

/// Give a claim back without counting it as an attempt (snooze, or release at shutdown): available
/// again after `$3` seconds; an optional note (`$4` kind, `$5` message) goes to the error history.
pub(crate) const JOB_SET_AVAILABLE_IF_RUNNING: &str = r#"
WITH locked AS MATERIALIZED (
    SELECT id, attempt, state FROM oncely.jobs WHERE id = $1 FOR UPDATE
), held AS (
    SELECT id FROM locked WHERE attempt = $2 AND state = 'running'
)
UPDATE oncely.jobs
SET state = 'available', run_at = now() + make_interval(secs => $3),
    snoozes = snoozes + 1, lease_expires_at = NULL,
    errors = CASE WHEN $4::text IS NULL THEN errors
                  ELSE errors || jsonb_build_array(jsonb_build_object(
                      'attempt', attempt, 'at', now(), 'kind', $4::text, 'message', $5::text)) END
WHERE id = (SELECT id FROM held)
RETURNING id
"#;

/// The handler cancelled its own job.
pub(crate) const JOB_SET_CANCELLED_IF_RUNNING: &str = r#"
WITH locked AS MATERIALIZED (
    SELECT id, attempt, state FROM oncely.jobs WHERE id = $1 FOR UPDATE
), held AS (
    SELECT id FROM locked WHERE attempt = $2 AND state = 'running'
)
UPDATE oncely.jobs
SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
    errors = errors || jsonb_build_array(jsonb_build_object(
        'attempt', attempt, 'at', now(), 'kind', 'error', 'message', 'cancelled by handler: ' || $3::text))
WHERE id = (SELECT id FROM held)
RETURNING id
"#;

/// Cancel a job that has not finished (a person's decision; a running claim is fenced out).
pub(crate) const JOB_CANCEL: &str = r#"
UPDATE oncely.jobs
SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL
WHERE id = $1 AND state IN ('available', 'running')
RETURNING id
"#;

/// Cancel the unfinished jobs among the ids in `$1` (a person's decision, e.g. deleting the webhook
/// endpoint they deliver to; running claims are fenced out). Returns the ids cancelled.
pub(crate) const JOB_CANCEL_MANY: &str = r#"
UPDATE oncely.jobs
SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL
WHERE id = ANY ($1::bigint[]) AND state IN ('available', 'running')
RETURNING id
"#;

/// Dismiss the dead jobs among the ids in `$1`: `cancelled`, so they leave the dead letter without
/// running again. Returns the ids dismissed.
pub(crate) const JOB_DISMISS_DEAD_MANY: &str = r#"
UPDATE oncely.jobs
SET state = 'cancelled', finished_at = coalesce(finished_at, now()), lease_expires_at = NULL
WHERE id = ANY ($1::bigint[]) AND state = 'dead'
RETURNING id
"#;

/// Delete the dead or cancelled jobs among the ids in `$1`. Returns the ids deleted.
pub(crate) const JOB_DELETE_FINISHED_MANY: &str = r#"
DELETE FROM oncely.jobs
WHERE id = ANY ($1::bigint[]) AND state IN ('dead', 'cancelled')
RETURNING id
"#;

/// Put a dead or cancelled job back in its queue, with one more attempt allowed.
pub(crate) const JOB_RETRY_FINISHED: &str = r#"
UPDATE oncely.jobs
SET state = 'available', run_at = now(), finished_at = NULL,
    max_attempts = greatest(max_attempts, attempt - snoozes + 1)
WHERE id = $1 AND state IN ('dead', 'cancelled')
RETURNING queue
"#;

/// The next batch of a bulk operation (`bulk.rs`): up to `$8` jobs with an id above `$1`, in
/// states `$2`, matching the optional kind `$3`, queue `$4`, creation range [`$5`, `$6`) and args
/// containment `$7`, locked in id order. The state is checked again on the locked rows.
macro_rules! job_bulk_batch {
    () => {
        r#"
WITH batch AS MATERIALIZED (
    SELECT id FROM oncely.jobs
    WHERE id > $1 AND state = ANY ($2::text[])
      AND ($3::text IS NULL OR kind = $3) AND ($4::text IS NULL OR queue = $4)
      AND ($5::timestamptz IS NULL OR created_at >= $5) AND ($6::timestamptz IS NULL OR created_at < $6)
      AND ($7::jsonb IS NULL OR args @> $7)
    ORDER BY id
    LIMIT $8
    FOR UPDATE
), done AS (
"#
    };
}

/// The tail of a bulk batch: where it stopped (`last`, NULL when nothing was left), how many rows
/// it locked and changed, and the queues of the changed rows.
macro_rules! job_bulk_report {
    () => {
        r#"
)
SELECT (SELECT max(id) FROM batch) AS last, (SELECT count(*) FROM batch) AS matched,
       (SELECT count(*) FROM done) AS changed, ARRAY(SELECT DISTINCT queue::text FROM done) AS queues
"#
    };
}

/// Cancel a batch of available or running jobs (running claims are fenced out).
pub(crate) const JOB_CANCEL_BATCH: &str = concat!(
    job_bulk_batch!(),
    r#"    UPDATE oncely.jobs
    SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL
    WHERE id = ANY (ARRAY(SELECT id FROM batch)) AND state = ANY ($2::text[]) AND state IN ('available', 'running')
    RETURNING queue"#,
    job_bulk_report!()
);

/// Put a batch of dead or cancelled jobs back, one more attempt allowed; a job whose unique key a
/// live job holds is left alone.
pub(crate) const JOB_RETRY_BATCH: &str = concat!(
    job_bulk_batch!(),
    r#"    UPDATE oncely.jobs AS j
    SET state = 'available', run_at = now(), finished_at = NULL,
        max_attempts = greatest(j.max_attempts, j.attempt + 1)
    WHERE j.id = ANY (ARRAY(SELECT id FROM batch)) AND j.state = ANY ($2::text[])
      AND j.state IN ('dead', 'cancelled')
      AND (j.unique_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM oncely.jobs AS l
          WHERE l.unique_key = j.unique_key AND l.state IN ('available', 'running')))
    RETURNING j.queue"#,
    job_bulk_report!()
);

/// Delete a batch of jobs that are not running.
pub(crate) const JOB_DELETE_BATCH: &str = concat!(
    job_bulk_batch!(),
    r#"    DELETE FROM oncely.jobs
    WHERE id = ANY (ARRAY(SELECT id FROM batch)) AND state = ANY ($2::text[]) AND state <> 'running'
    RETURNING queue"#,
    job_bulk_report!()
);

/// Rescue up to `$1` running jobs whose lease expired: available again now, or dead when out of
/// attempts. A lone expiry is given back (not counted, like a snooze: `snoozes` goes up by one); one
/// that follows another expiry (the history's last entry) counts.
pub(crate) const JOB_RESCUE_EXPIRED: &str = r#"
WITH expired AS MATERIALIZED (
    SELECT id, coalesce(errors -> -1 ->> 'kind' = 'lease_expired', false) AS again
    FROM oncely.jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE oncely.jobs AS j
SET state = CASE WHEN NOT expired.again OR j.attempt - j.snoozes < j.max_attempts THEN 'available' ELSE 'dead' END,
    run_at = now(),
    finished_at = CASE WHEN NOT expired.again OR j.attempt - j.snoozes < j.max_attempts THEN NULL ELSE now() END,
    snoozes = j.snoozes + CASE WHEN expired.again THEN 0 ELSE 1 END,
    lease_expires_at = NULL,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'at', now(), 'kind', 'lease_expired',
        'message', 'lease expired while running on worker ' || coalesce(j.worker_id, '?')
                   || CASE WHEN expired.again THEN '' ELSE ' (first expiry in a row: not counted)' END))
FROM expired
-- The primary key drives the update whatever the statistics; the join only reads `again`.
WHERE j.id = ANY (ARRAY(SELECT id FROM expired)) AND j.id = expired.id
RETURNING j.id, j.state, j.queue
"#;

/// Delete up to `$3` finished jobs past their retention (`$1` seconds for completed and cancelled,
/// `$2` for dead), with the child-run rows (as parents) and the event-wait rows of the deleted
/// jobs. Returns how many jobs.
pub(crate) const JOB_DELETE_FINISHED: &str = r#"
WITH gone AS (
    DELETE FROM oncely.jobs
    WHERE id IN (
        SELECT id FROM oncely.jobs
        WHERE (state IN ('completed', 'cancelled') AND finished_at < now() - make_interval(secs => $1))
           OR (state = 'dead' AND finished_at < now() - make_interval(secs => $2))
        LIMIT $3
    )
    RETURNING id
), children AS (
    DELETE FROM oncely.child_runs WHERE parent_id IN (SELECT id FROM gone)
), waits AS (
    DELETE FROM oncely.event_waits WHERE run_id IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone
"#;

/// Wake workers listening on the queues in `$1`.
pub(crate) const QUEUE_NOTIFY_MANY: &str =
    concat!("SELECT pg_notify(", jobs_channel!(), ", q) FROM (SELECT DISTINCT unnest($1::text[]) AS q) AS queues");

/// Counts of jobs by queue and state.
pub(crate) const JOB_COUNT_BY_QUEUE_AND_STATE: &str =
    "SELECT queue, state, count(*) AS n FROM oncely.jobs GROUP BY queue, state ORDER BY queue, state";

/// Debounce (`crate::debounce`), under the key's advisory lock: merge into the waiting job with
/// debounce key `$1` and kind `$2` (available and never started): its arguments become `$3`, and
/// its `run_at` moves to `$4` seconds from now, but never past its `created_at` plus `$5` seconds
/// (the maximum wait; `NULL`: none, `least` ignores it). A claim that locked the row first wins: the
/// row is then running, this updates nothing, and the caller inserts a new job.
pub(crate) const JOB_DEBOUNCE_MERGE: &str = r#"
UPDATE oncely.jobs
SET args = $3,
    run_at = least(clock_timestamp() + make_interval(secs => $4), created_at + make_interval(secs => $5))
WHERE debounce_key = $1 AND kind = $2 AND state = 'available' AND attempt = 0
RETURNING id, run_at
"#;

/// Debounce, when there is no waiting job to merge into: a job due `$5` seconds from now (or at the
/// maximum wait `$7`, if that is sooner), carrying debounce key `$8` and traceparent `$9`.
pub(crate) const JOB_DEBOUNCE_INSERT: &str = r#"
INSERT INTO oncely.jobs (kind, queue, args, priority, run_at, max_attempts, debounce_key, traceparent)
VALUES ($1, $2, $3, $4,
        least(clock_timestamp() + make_interval(secs => $5), clock_timestamp() + make_interval(secs => $7)),
        $6, $8, $9)
RETURNING id, run_at
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn the_sql_channel_literal_is_the_channel() {
        assert_eq!(jobs_channel!(), format!("'{}'", super::JOBS_CHANNEL));
    }
}
