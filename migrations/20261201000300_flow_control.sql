-- oncely: flow control. Migrations are additive: never edit this file once it has been applied.

-- Paused queues and job kinds, fleet-wide: the claim statement claims nothing from a paused queue
-- and no job of a paused kind. Running jobs are not touched; they finish under their lease.
-- One row per pause: (scope, name) with scope 'queue' or 'kind'. A tiny table, read by every claim
-- through its primary key (or a scan of a few rows).
CREATE TABLE oncely.pauses (
    scope     text        NOT NULL CHECK (scope IN ('queue', 'kind')),
    name      text        NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    paused_at timestamptz NOT NULL DEFAULT now(),
    reason    text        CHECK (reason IS NULL OR length(reason) <= 1000),
    PRIMARY KEY (scope, name)
);

-- Unique for a period (`unique.rs`): a key stays taken for a period after its job finished. The
-- lookup reads every job that ever carried the key, finished ones included; only rows with a key
-- are indexed.
CREATE INDEX jobs_unique_key_any_state_idx ON oncely.jobs (unique_key, id) WHERE unique_key IS NOT NULL;
