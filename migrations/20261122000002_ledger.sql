-- oncely: the effect ledger — one record per "do this once" key, shared by job steps,
-- with_idempotency and the HTTP middleware. Additive: never edit once applied.
CREATE TABLE oncely.ledger (
    namespace        text        NOT NULL CHECK (length(namespace) BETWEEN 1 AND 255),
    key              text        NOT NULL CHECK (length(key) BETWEEN 1 AND 1024),
    -- What the request was (e.g. a SHA-256 of method, route and body); NULL: not checked.
    fingerprint      text,
    state            text        NOT NULL CHECK (state IN ('in_progress', 'completed')),
    -- Incremented by every claim; the fencing token of the write that completes or releases it.
    attempt          integer     NOT NULL DEFAULT 1,
    -- Who holds the claim (e.g. 'job:42:3' for attempt 3 of job 42), and until when.
    owner            text        NOT NULL,
    lease_expires_at timestamptz,
    -- When a claim took over an in-progress record: the owner that never recorded a result.
    previous_owner   text,
    output           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- After this the record counts as absent and maintenance deletes it; NULL: kept forever.
    expires_at       timestamptz,
    PRIMARY KEY (namespace, key)
);

CREATE INDEX ledger_expires_idx ON oncely.ledger (expires_at) WHERE expires_at IS NOT NULL;

-- One row per maintenance run that deleted something or was asked to audit itself.
CREATE TABLE oncely.maintenance_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task        text        NOT NULL,
    worker_id   text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    deleted     bigint      NOT NULL DEFAULT 0
);
CREATE INDEX maintenance_runs_task_idx ON oncely.maintenance_runs (task, started_at DESC);
