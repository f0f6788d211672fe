-- oncely: concurrency keys, queue limits, rate limits and fairness across keys (issue 16).
-- Migrations are additive: never edit this file once it has been applied.

-- A job may carry a flow key (`NewJob::concurrency_key`): at most `concurrency_limit` jobs with the
-- key run at once in its queue, fleet-wide; claims go round-robin across the keys of a queue.
ALTER TABLE oncely.jobs
    ADD COLUMN flow_key   text CHECK (flow_key IS NULL OR length(flow_key) BETWEEN 1 AND 512),
    ADD COLUMN flow_limit integer CHECK (flow_limit IS NULL OR flow_limit >= 1);

-- The plain claim (JOB_CLAIM) reads only jobs without a key: the claim index no longer holds keyed
-- jobs, so a keyed backlog costs the plain drain nothing.
DROP INDEX oncely.jobs_fetch_idx;
CREATE INDEX jobs_fetch_idx ON oncely.jobs (queue, priority DESC, run_at, id)
    WHERE state = 'available' AND flow_key IS NULL;
-- The keyed claim: a key's next jobs.
CREATE INDEX jobs_flow_fetch_idx ON oncely.jobs (queue, flow_key, priority DESC, run_at, id)
    WHERE state = 'available' AND flow_key IS NOT NULL;
-- A key's slots in use: its running jobs (slots are running rows, so a crashed worker's slots come
-- back with its lease, when the rescue moves the rows out of `running`).
CREATE INDEX jobs_flow_running_idx ON oncely.jobs (queue, flow_key)
    WHERE state = 'running' AND flow_key IS NOT NULL;

-- One row per (queue, key) that has carried jobs. Claimers lock a key's row (SKIP LOCKED) before
-- they count its running jobs in a new statement, so two claimers never both see the same free slot.
-- `idle`: no available job had the key when it was last claimed (skipped by the claim's scan; an
-- available job with the key clears it, under the row's lock).
CREATE TABLE oncely.flow_keys (
    queue              text        NOT NULL,
    key                text        NOT NULL,
    concurrency_limit  integer     CHECK (concurrency_limit IS NULL OR concurrency_limit >= 1),
    -- Rate limit (GCRA): one start every `rate_interval_secs`, bursts of up to `rate_burst`;
    -- `tat` is the theoretical arrival time of the next start.
    rate_interval_secs float8      CHECK (rate_interval_secs IS NULL OR rate_interval_secs > 0),
    rate_burst         integer     NOT NULL DEFAULT 1 CHECK (rate_burst >= 1),
    tat                timestamptz,
    last_claimed_at    timestamptz NOT NULL DEFAULT '-infinity',
    idle               boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (queue, key)
);
-- Round robin: the keys of a queue with work, least recently claimed first.
CREATE INDEX flow_keys_next_idx ON oncely.flow_keys (queue, last_claimed_at, key) WHERE NOT idle;

-- A global limit of running jobs per queue, whatever the number of workers.
CREATE TABLE oncely.queue_limits (
    queue       text    PRIMARY KEY CHECK (length(queue) BETWEEN 1 AND 128),
    max_running integer NOT NULL CHECK (max_running >= 1)
);

-- A keyed job that becomes available (inserted, retried, snoozed, rescued) makes sure its key's row
-- exists and is not idle, and takes its row lock: a claimer holding the lock is deciding the key is
-- idle, and the job waits for it (then clears `idle`); a claimer arriving later skips the key until
-- this transaction commits. A keyed job leaving `running` wakes its queue's workers: a slot is free.
CREATE FUNCTION oncely.flow_key_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'available' THEN
        INSERT INTO oncely.flow_keys AS f (queue, key, concurrency_limit)
        VALUES (NEW.queue, NEW.flow_key, NEW.flow_limit)
        ON CONFLICT (queue, key) DO UPDATE
            SET idle = false, concurrency_limit = coalesce(EXCLUDED.concurrency_limit, f.concurrency_limit)
            WHERE f.idle OR f.concurrency_limit IS DISTINCT FROM coalesce(EXCLUDED.concurrency_limit, f.concurrency_limit);
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.state = 'running' AND NEW.state <> 'running' THEN
        PERFORM pg_notify('oncely_jobs', NEW.queue);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_flow_key_insert AFTER INSERT ON oncely.jobs
    FOR EACH ROW WHEN (NEW.flow_key IS NOT NULL AND NEW.state = 'available')
    EXECUTE FUNCTION oncely.flow_key_touch();
CREATE TRIGGER jobs_flow_key_update AFTER UPDATE OF state ON oncely.jobs
    FOR EACH ROW WHEN (NEW.flow_key IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state
                       AND (NEW.state = 'available' OR OLD.state = 'running'))
    EXECUTE FUNCTION oncely.flow_key_touch();
