-- oncely: event-driven functions — event subscriptions, cron schedules, and event idempotency keys.
-- Additive: never edit once applied.

-- One row per (function, topic pattern): publish inserts one run (a job of kind `function`) per
-- matching row, in the statement that stores the event. Workers upsert their functions' rows at
-- start. A pattern is an exact topic (`topic`) or a prefix (`report.*` is stored as topic_prefix
-- 'report.'; `*` as ''). `filter` is a jsonb containment the payload must satisfy (NULL: any).
CREATE TABLE oncely.function_subscriptions (
    function     oncely.name       NOT NULL,
    pattern      oncely.name       NOT NULL,
    topic        text,
    topic_prefix text,
    filter       jsonb,
    queue        oncely.queue_name NOT NULL,
    max_attempts oncely.positive   NOT NULL,
    updated_at   timestamptz       NOT NULL DEFAULT now(),
    PRIMARY KEY (function, pattern),
    CHECK ((topic IS NULL) <> (topic_prefix IS NULL))
);
CREATE INDEX function_subscriptions_topic_idx ON oncely.function_subscriptions (topic) WHERE topic IS NOT NULL;

-- One row per cron function. Whoever locks a due row (FOR UPDATE SKIP LOCKED) enqueues the tick's
-- run and advances next_tick in one transaction: one run per tick across the fleet.
CREATE TABLE oncely.schedules (
    function     oncely.name       PRIMARY KEY,
    cron         text              NOT NULL,
    timezone     text              NOT NULL,
    queue        oncely.queue_name NOT NULL,
    max_attempts oncely.positive   NOT NULL,
    next_tick    timestamptz       NOT NULL,
    last_tick    timestamptz,
    updated_at   timestamptz       NOT NULL DEFAULT now()
);
CREATE INDEX schedules_next_tick_idx ON oncely.schedules (next_tick);

-- Event idempotency keys: a publish with a key held by a live row is a no-op returning the event
-- recorded here. Expired rows are replaced by the next publish with the key and pruned by
-- maintenance. The event's id and uid are kept here so a duplicate can answer without reading an
-- event its snapshot may not see yet.
CREATE TABLE oncely.event_keys (
    key        oncely.ledger_key NOT NULL PRIMARY KEY,
    event_id   bigint      NOT NULL,
    event_uid  uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_keys_expires_idx ON oncely.event_keys (expires_at);
