-- oncely: the transactional outbox, webhook endpoints and deliveries, and the inbox.
-- Additive: never edit once applied. Value checks are domains (see the previous migration); the
-- API validates URLs and topic lists before they get here.

-- An event published inside the caller's transaction: it exists if and only if that commits.
-- Delivery never scans this table by "id > last seen": publish fans the event out, in the same
-- statement, into one delivery row and one job per subscribed endpoint, so a transaction that
-- commits late is delivered like any other.
CREATE TABLE oncely.events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The Standard Webhooks message id is derived from it (`msg_` + hex): stable across retries.
    uid          uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    topic        oncely.name NOT NULL,
    payload      jsonb       NOT NULL,
    -- Events with the same ordering key are numbered in commit order (publish holds a transaction
    -- lock on the key), and ordered endpoints receive them in that order.
    ordering_key oncely.name,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_created_idx ON oncely.events (created_at);

CREATE TABLE oncely.webhook_endpoints (
    id                         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url                        text        NOT NULL,
    -- Topics the endpoint receives; '*' receives every topic.
    topics                     text[]      NOT NULL,
    -- `whsec_` + base64 of 24 to 64 random bytes.
    secret                     text        NOT NULL,
    -- During a rotation the old secret also signs, until it expires.
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    -- Deliver events that share an ordering key one at a time, in order.
    ordered                    boolean     NOT NULL DEFAULT false,
    enabled                    boolean     NOT NULL DEFAULT true,
    disabled_reason            text,
    disabled_at                timestamptz,
    -- Start of the current run of failed attempts; NULL after a success.
    failing_since              timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_topics_idx ON oncely.webhook_endpoints USING gin (topics) WHERE enabled;

-- One row per (endpoint, event): what was tried, and the job that delivers it.
CREATE TABLE oncely.webhook_deliveries (
    endpoint_id     bigint      NOT NULL REFERENCES oncely.webhook_endpoints (id) ON DELETE CASCADE,
    event_id        bigint      NOT NULL REFERENCES oncely.events (id) ON DELETE CASCADE,
    -- Set only for ordered endpoints.
    ordering_key    text,
    -- The delivery job (no foreign key: finished jobs are pruned).
    job_id          bigint      NOT NULL,
    attempts        oncely.non_negative NOT NULL DEFAULT 0,
    last_status     integer,
    last_error      text,
    last_attempt_at timestamptz,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_event_idx ON oncely.webhook_deliveries (event_id);
CREATE INDEX webhook_deliveries_order_idx ON oncely.webhook_deliveries (endpoint_id, ordering_key, event_id)
    WHERE ordering_key IS NOT NULL AND delivered_at IS NULL;

-- Inbound events accepted at most once per (source, event id), with the job that processes them.
CREATE TABLE oncely.inbox (
    source      oncely.name NOT NULL,
    event_id    oncely.name NOT NULL,
    payload     jsonb       NOT NULL,
    job_id      bigint      NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);
CREATE INDEX inbox_received_idx ON oncely.inbox (received_at);
