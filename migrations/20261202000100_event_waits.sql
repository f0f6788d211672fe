-- oncely: durable waits of function runs — wait_for_event and cancel_on.
-- Additive: never edit once applied.

-- One row per (run, wait step). A run waiting for an event (kind 'event') or cancellable by one
-- (kind 'cancel') registers a row; publish resolves the unresolved rows its events match
-- (resolved_at, event_id), first event wins. `path` is the field of the awaited event's payload,
-- `value` the text (`#>>`) it must have. `since`: events published (transaction start) at or after it
-- also count when they committed before the registration (the look-back).
CREATE TABLE oncely.event_waits (
    run_id        bigint      NOT NULL,
    step          text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('event', 'cancel')),
    topic         oncely.name NOT NULL,
    path          text[]      NOT NULL CHECK (cardinality(path) >= 1),
    value         text        NOT NULL,
    since         timestamptz NOT NULL,
    timeout_at    timestamptz,
    registered_at timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    event_id      bigint,
    PRIMARY KEY (run_id, step)
);
-- Publish's matching: only unresolved waits, by (topic, path, value).
CREATE INDEX event_waits_match_idx ON oncely.event_waits (topic, path, value) WHERE resolved_at IS NULL;

-- The payload paths awaited per topic: publish reads the paths of its topics here (an index
-- lookup that finds nothing when no run ever waited on the topic), then matches waits by value.
CREATE TABLE oncely.event_wait_paths (
    topic      oncely.name NOT NULL,
    path       text[]      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, path)
);

-- Called by publish (in its statement) with the events it stored. VOLATILE plpgsql: under READ
-- COMMITTED each statement below takes a new snapshot, so a lookup made after a lock sees what was
-- committed before the lock was granted. The protocol (docs/functions.md):
--   publish:      shared lock on the topic; read the topic's paths; shared lock per (topic, path,
--                 value); resolve the matching unresolved waits and wake (or cancel) their runs.
--   registration: a new path takes the topic's lock exclusively (waiting for publishers in flight)
--                 and commits it first; then, per wait, the (topic, path, value) lock exclusively,
--                 insert the wait, and look up matching committed events.
-- Either the publisher's lookup sees the committed wait, or the registration's lookup sees the
-- committed event; the wait row's `resolved_at IS NULL` condition lets one of them resolve it.
CREATE FUNCTION oncely.resolve_event_waits(ids bigint[], topics text[], payloads jsonb[])
RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    t text;
    n integer;
BEGIN
    IF ids IS NULL OR cardinality(ids) = 0 THEN
        RETURN 0;
    END IF;
    FOR t IN SELECT DISTINCT x FROM unnest(topics) AS x ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('oncely.wait/' || t, 0));
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM oncely.event_wait_paths p WHERE p.topic = ANY(topics)) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(k) FROM (
        SELECT DISTINCT hashtextextended('oncely.wait/' || e.topic || '/' || array_to_string(p.path, '.') || '=' || (e.payload #>> p.path), 0) AS k
        FROM unnest(topics, payloads) AS e(topic, payload)
        JOIN oncely.event_wait_paths p ON p.topic = e.topic
        WHERE e.payload #>> p.path IS NOT NULL
        ORDER BY 1
    ) AS keys;
    WITH m AS (
        SELECT DISTINCT ON (w.run_id, w.step) w.run_id, w.step, w.kind, e.id AS event_id
        FROM unnest(ids, topics, payloads) AS e(id, topic, payload)
        JOIN oncely.event_wait_paths p ON p.topic = e.topic
        JOIN oncely.event_waits w
          ON w.topic = e.topic AND w.path = p.path AND w.value = (e.payload #>> p.path) AND w.resolved_at IS NULL
        ORDER BY w.run_id, w.step, e.id
    ), resolved AS (
        UPDATE oncely.event_waits w SET resolved_at = now(), event_id = m.event_id
        FROM m WHERE w.run_id = m.run_id AND w.step = m.step AND w.resolved_at IS NULL
        RETURNING w.run_id, w.kind, w.step, w.topic, m.event_id
    ), woken AS (
        -- A suspended run (available, later) runs now; a running one finds its wait resolved or
        -- its cancellation at its next step boundary.
        UPDATE oncely.jobs j SET run_at = now()
        FROM resolved r
        WHERE j.id = r.run_id AND r.kind = 'event' AND j.state = 'available' AND j.run_at > now()
        RETURNING pg_notify('oncely_jobs', j.queue) IS NULL AS notified
    ), cancelled AS (
        UPDATE oncely.jobs j SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
            errors = j.errors || jsonb_build_array(jsonb_build_object('attempt', j.attempt, 'at', now(),
                'kind', 'error', 'message', format('cancelled by event %s on topic %s (cancel_on)', r.event_id, r.topic)))
        FROM resolved r
        WHERE j.id = r.run_id AND r.kind = 'cancel' AND j.state = 'available'
        RETURNING j.id
    )
    -- Data-modifying CTEs run to completion whether read or not.
    SELECT count(*) INTO n FROM resolved;
    RETURN n;
END;
$$;
