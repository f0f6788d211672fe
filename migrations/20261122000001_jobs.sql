-- oncely: the job queue.
-- Migrations are additive: never edit this file once it has been applied anywhere.
CREATE SCHEMA IF NOT EXISTS oncely;

CREATE TABLE oncely.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text        NOT NULL CHECK (length(kind) BETWEEN 1 AND 255),
    queue            text        NOT NULL DEFAULT 'default' CHECK (length(queue) BETWEEN 1 AND 128),
    args             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Higher runs first.
    priority         smallint    NOT NULL DEFAULT 0,
    state            text        NOT NULL DEFAULT 'available'
                     CHECK (state IN ('available', 'running', 'completed', 'dead', 'cancelled')),
    -- Incremented by every claim; the fencing token of every later state write.
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer     NOT NULL DEFAULT 20 CHECK (max_attempts >= 1),
    -- Claims that ended in a snooze or a release (they do not count against max_attempts).
    snoozes          integer     NOT NULL DEFAULT 0 CHECK (snoozes >= 0),
    run_at           timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempted_at     timestamptz,
    finished_at      timestamptz,
    lease_expires_at timestamptz,
    worker_id        text,
    unique_key       text CHECK (unique_key IS NULL OR length(unique_key) BETWEEN 1 AND 512),
    -- One object per failed attempt: {attempt, at, kind, message}.
    errors           jsonb       NOT NULL DEFAULT '[]'::jsonb
);

-- Claiming: the next available jobs of a queue, by priority then run_at.
CREATE INDEX jobs_fetch_idx ON oncely.jobs (queue, priority DESC, run_at, id) WHERE state = 'available';
-- Rescue: running jobs whose lease expired.
CREATE INDEX jobs_lease_idx ON oncely.jobs (lease_expires_at) WHERE state = 'running';
-- Pruning finished jobs after their retention period.
CREATE INDEX jobs_finished_idx ON oncely.jobs (finished_at) WHERE state IN ('completed', 'dead', 'cancelled');
-- A unique key dedupes while a job holding it is not finished.
CREATE UNIQUE INDEX jobs_unique_key_idx ON oncely.jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('available', 'running');

-- Wake-ups: the enqueue statements NOTIFY channel 'oncely_jobs' with the queue name when they make
-- work available now (no trigger: it costs a quarter of single-row enqueue throughput). Listeners
-- treat notifications as hints only; polling is the fallback, so rows inserted by other means are
-- still found.

-- Leader election for maintenance services: one row per service name, held by a lease.
CREATE TABLE oncely.leaders (
    name       text PRIMARY KEY,
    leader_id  text        NOT NULL,
    elected_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
