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
