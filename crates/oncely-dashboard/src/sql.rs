//! The dashboard's SQL. Pages read rows as JSON built by PostgreSQL (`json_agg`), which the
//! templates render directly; actions go through oncely-core where it has the operation.

/// Per queue: counts by state, and the last hour's completions and deaths. One scan of the jobs
/// table grouped by queue; a page view, not a hot path.
pub(crate) const QUEUES: &str = "\
SELECT coalesce(json_agg(q ORDER BY q.queue), '[]'::json) FROM (
  SELECT queue,
         count(*) FILTER (WHERE state = 'available' AND run_at <= now()) AS available,
         count(*) FILTER (WHERE state = 'available' AND run_at > now()) AS scheduled,
         count(*) FILTER (WHERE state = 'running') AS running,
         count(*) FILTER (WHERE state = 'completed') AS completed,
         count(*) FILTER (WHERE state = 'dead') AS dead,
         count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
         count(*) FILTER (WHERE state = 'completed' AND finished_at > now() - interval '1 hour') AS completed_1h,
         count(*) FILTER (WHERE state = 'dead' AND finished_at > now() - interval '1 hour') AS dead_1h,
         round(100.0 * count(*) FILTER (WHERE state = 'dead' AND finished_at > now() - interval '1 hour')
               / nullif(count(*) FILTER (WHERE state IN ('completed', 'dead')
                                          AND finished_at > now() - interval '1 hour'), 0), 1) AS failure_pct
  FROM oncely.jobs GROUP BY queue) q";

/// Jobs matching the filters, newest first, after a keyset cursor (`id < $5`); one more than a
/// page is fetched to know whether there is a next page.
pub(crate) const JOBS: &str = "\
SELECT coalesce(json_agg(j ORDER BY j.id DESC), '[]'::json) FROM (
  SELECT id, kind, queue, state, attempt, max_attempts, created_at, finished_at, run_at,
         left(args::text, 120) AS args
  FROM oncely.jobs
  WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR queue = $3)
    AND ($4::text IS NULL OR strpos(args::text, $4) > 0) AND ($5::bigint IS NULL OR id < $5)
  ORDER BY id DESC LIMIT $6) j";

/// One job, whole.
pub(crate) const JOB: &str = "\
SELECT to_json(j) FROM (
  SELECT id, kind, queue, state, priority, attempt, max_attempts, snoozes, run_at, created_at, attempted_at,
         finished_at, lease_expires_at, worker_id, unique_key, jsonb_pretty(args) AS args, errors, traceparent
  FROM oncely.jobs WHERE id = $1) j";

/// A job's steps: effect records of the `step` namespace keyed or owned by the job, in order.
pub(crate) const JOB_STEPS: &str = "\
SELECT coalesce(json_agg(s ORDER BY s.created_at, s.key), '[]'::json) FROM (
  SELECT namespace, key, state, attempt, owner, previous_owner, created_at, updated_at,
         state = 'in_progress' AND previous_owner IS NOT NULL AND (lease_expires_at IS NULL OR lease_expires_at <= now())
           AS parked,
         left(output::text, 200) AS output
  FROM oncely.ledger
  WHERE namespace = 'step'
    AND (key LIKE $1 || '%' OR owner LIKE $1 || '%' OR previous_owner LIKE $1 || '%')) s";

/// Effect records whose outcome is unknown: an earlier claimant left no result, nobody holds them.
pub(crate) const PARKED: &str = "\
SELECT coalesce(json_agg(r ORDER BY r.updated_at DESC), '[]'::json) FROM (
  SELECT namespace, key, attempt, owner, previous_owner, updated_at
  FROM oncely.ledger
  WHERE state = 'in_progress' AND previous_owner IS NOT NULL
    AND (lease_expires_at IS NULL OR lease_expires_at <= now())
  ORDER BY updated_at DESC LIMIT 200) r";

/// One effect record; the output only when `$3`.
pub(crate) const RECORD: &str = "\
SELECT to_json(r) FROM (
  SELECT namespace, key, state, attempt, owner, previous_owner, lease_expires_at, created_at, updated_at, expires_at,
         lease_expires_at > now() AS live,
         CASE WHEN $3 THEN jsonb_pretty(output) END AS output, output IS NOT NULL AS has_output
  FROM oncely.ledger WHERE namespace = $1 AND key = $2) r";

/// Webhook endpoints, without their secrets.
pub(crate) const ENDPOINTS: &str = "\
SELECT coalesce(json_agg(e ORDER BY e.id), '[]'::json) FROM (
  SELECT id, url, array_to_string(topics, ', ') AS topics, ordered, enabled, disabled_reason, disabled_at,
         failing_since
  FROM oncely.webhook_endpoints) e";

/// The latest deliveries.
pub(crate) const DELIVERIES: &str = "\
SELECT coalesce(json_agg(d ORDER BY d.event_id DESC, d.endpoint_id), '[]'::json) FROM (
  SELECT d.endpoint_id, d.event_id, e.topic, d.job_id, d.attempts, d.last_status, left(d.last_error, 200) AS last_error,
         d.last_attempt_at, d.delivered_at
  FROM oncely.webhook_deliveries d JOIN oncely.events e ON e.id = d.event_id
  ORDER BY d.event_id DESC LIMIT 100) d";

/// Queue depth by queue and state, and the age of the oldest available job per queue: the
/// metrics endpoint's one query per scrape.
pub(crate) const DEPTH: &str = "\
SELECT queue, state, count(*)::bigint AS n,
       coalesce(extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'available' AND run_at <= now())), 0)::float8
         AS oldest
FROM oncely.jobs WHERE state IN ('available', 'running', 'dead') GROUP BY queue, state";
