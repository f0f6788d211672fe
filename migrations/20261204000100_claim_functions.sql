-- The two claim statements as functions, so that PostgreSQL plans them once per connection instead
-- of on every claim (crates/oncely-core/src/job/sql.rs calls them: JOB_CLAIM, JOB_CLAIM_WINDOWED).
--
-- Sent as prepared statements, both claims were planned again on every execution: after five runs
-- the plan cache compares the generic plan's estimated cost with the custom plans', and the generic
-- plan looks dearer by its estimates (`LIMIT $2` taken as a tenth of the input, `unnest` of a
-- parameter as 10 rows), so it kept making custom plans: 0.14-0.25 ms of planning per claim against
-- 0.17-0.37 ms of execution. `plan_cache_mode = force_generic_plan` would stop that, but it is session
-- state and the worker runs on the host's pool (and behind PgBouncer); set on a function it holds
-- only while the function runs. PL/pgSQL keeps each statement's plan for the connection's life
-- (re-planned when the tables' statistics or definitions change), so the function's one query runs
-- its generic plan. tests/it/plans.rs checks that generic plan under three sets of statistics, as
-- it checks every hot statement: it reads the query back from pg_proc.
--
-- Both return whole `oncely.jobs` rows (the claim's RETURNING j.*); a later column added to the
-- table is returned too. Called by the worker; not a stable API.

-- Claim up to claim_limit due jobs of claim_queue (skipping paused queues and kinds), highest
-- priority first, then oldest run_at: lease them to claim_worker for lease_secs seconds. Only jobs
-- without a concurrency key, and nothing from a queue with a global limit unless queue_limited
-- (the flow claim, crates/oncely-core/src/flow.rs, which holds that limit's row lock).
--
-- The scan walks the queue's priorities one by one (a loose index scan over jobs_fetch_idx: each
-- step is one probe for the next lower priority present), and within one priority reads
-- run_at <= now() as a range of the index, so it stops at the first job not yet due.
CREATE FUNCTION oncely.claim_from_head(
    claim_queue   text,
    claim_limit   integer,
    lease_secs    double precision,
    claim_worker  text,
    queue_limited boolean
) RETURNS SETOF oncely.jobs
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH RECURSIVE priorities AS (
        (SELECT priority FROM oncely.jobs WHERE state = 'available' AND flow_key IS NULL AND queue = claim_queue
         ORDER BY priority DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT j.priority FROM oncely.jobs AS j
                WHERE j.state = 'available' AND j.flow_key IS NULL AND j.queue = claim_queue AND j.priority < p.priority
                ORDER BY j.priority DESC LIMIT 1)
        FROM priorities AS p
        WHERE p.priority IS NOT NULL
    ), next AS MATERIALIZED (
        SELECT c.id
        FROM priorities AS p
        CROSS JOIN LATERAL (
            SELECT id FROM oncely.jobs
            WHERE state = 'available' AND flow_key IS NULL AND queue = claim_queue AND priority = p.priority AND run_at <= now()
              -- Pauses (`pause.rs`): two init plans over a tiny table, evaluated once per claim. The
              -- kind is compared as `kind || ''` so the planner cannot estimate it from the column's
              -- statistics: with few distinct kinds it took `kind <> ALL (unknown array)` to match no
              -- row and chose a sequential scan and sort of the whole queue (0.25 s per claim over
              -- 200k jobs).
              AND NOT EXISTS (SELECT 1 FROM oncely.pauses WHERE scope = 'queue' AND name = claim_queue)
              AND (kind || '') <> ALL (ARRAY(SELECT name FROM oncely.pauses WHERE scope = 'kind'))
              -- A queue with a global limit (`flow.rs`) is claimed by the flow claim, which counts its
              -- running jobs under the limit's row lock; `queue_limited` is true there.
              AND (queue_limited OR NOT EXISTS (SELECT 1 FROM oncely.queue_limits WHERE queue = claim_queue))
            ORDER BY run_at, id
            LIMIT claim_limit
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE p.priority IS NOT NULL
        LIMIT claim_limit
    )
    UPDATE oncely.jobs AS j
    SET state = 'running', attempt = j.attempt + 1, attempted_at = clock_timestamp(),
        lease_expires_at = now() + make_interval(secs => lease_secs), worker_id = claim_worker
    WHERE j.id = ANY (ARRAY(SELECT id FROM next))
    RETURNING j.*;
END
$$;

-- oncely.claim_from_head within a window: for each priority in window_priorities (highest first),
-- only jobs with run_at >= the matching floor in window_floors, read as a range of jobs_fetch_idx.
-- The index entries of jobs claimed since the oldest open snapshot began sit at the head of each
-- priority's range until that snapshot ends; the floor steps over them (crates/oncely-core/src/
-- lease.rs, ClaimWindow). Never claims from a queue with a global limit.
CREATE FUNCTION oncely.claim_windowed(
    claim_queue       text,
    claim_limit       integer,
    lease_secs        double precision,
    claim_worker      text,
    window_priorities smallint[],
    window_floors     timestamptz[]
) RETURNS SETOF oncely.jobs
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH next AS MATERIALIZED (
        SELECT c.id
        FROM unnest(window_priorities::smallint[], window_floors::timestamptz[]) AS w(priority, floor)
        CROSS JOIN LATERAL (
            SELECT id FROM oncely.jobs
            WHERE state = 'available' AND flow_key IS NULL AND queue = claim_queue AND priority = w.priority
              AND run_at >= w.floor AND run_at <= now()
              -- As in oncely.claim_from_head.
              AND NOT EXISTS (SELECT 1 FROM oncely.pauses WHERE scope = 'queue' AND name = claim_queue)
              AND (kind || '') <> ALL (ARRAY(SELECT name FROM oncely.pauses WHERE scope = 'kind'))
              AND NOT EXISTS (SELECT 1 FROM oncely.queue_limits WHERE queue = claim_queue)
            ORDER BY run_at, id
            LIMIT claim_limit
            FOR UPDATE SKIP LOCKED
        ) AS c
        LIMIT claim_limit
    )
    UPDATE oncely.jobs AS j
    SET state = 'running', attempt = j.attempt + 1, attempted_at = clock_timestamp(),
        lease_expires_at = now() + make_interval(secs => lease_secs), worker_id = claim_worker
    WHERE j.id = ANY (ARRAY(SELECT id FROM next))
    RETURNING j.*;
END
$$;
