-- Tracing across the queue: the W3C `traceparent` of the span that enqueued a job
-- (crates/oncely-core/src/trace.rs). NULL when there is none; adding a nullable column without a
-- default rewrites nothing.
ALTER TABLE oncely.jobs ADD COLUMN traceparent text;

-- The same rules as `TraceParent::parse` (lowercase hex, version not ff, ids not all zeros, 55
-- characters: a later version's extra fields are dropped before storing). NOT VALID: existing rows
-- are all NULL, so there is nothing to scan; new and updated rows are checked. A NULL passes
-- without running the pattern.
ALTER TABLE oncely.jobs ADD CONSTRAINT jobs_traceparent_check CHECK (
    traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
    AND left(traceparent, 2) <> 'ff'
    AND substr(traceparent, 4, 32) <> '00000000000000000000000000000000'
    AND substr(traceparent, 37, 16) <> '0000000000000000'
) NOT VALID;

-- oncely.enqueue gains `traceparent` (last, defaulted): calls written for the old signature, by
-- position or by name, keep working. A new parameter makes a new function, so the old one goes.
DROP FUNCTION oncely.enqueue(text, jsonb, text, integer, timestamptz, interval, integer, text);

-- oncely.enqueue: enqueue a job from SQL, in the caller's own transaction, from any language.
-- The same checks, unique-key dedupe and NOTIFY as the Rust enqueue (crates/oncely-core/src/queue.rs):
--   SELECT oncely.enqueue('send_email', '{"to": "a@example.com"}');
--   SELECT oncely.enqueue('report', '{"id": 7}', queue => 'reports', unique_key => 'report:7',
--                         delay => interval '5 minutes',
--                         traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
-- Returns the job's id; with a unique key a live (available or running) job already holds, that
-- job's id and nothing is inserted. Bad input raises SQLSTATE 22023 (invalid_parameter_value)
-- with the Rust API's message.
CREATE FUNCTION oncely.enqueue(
    kind         text,
    args         jsonb       DEFAULT '{}'::jsonb,
    queue        text        DEFAULT 'default',
    priority     integer     DEFAULT 0,
    run_at       timestamptz DEFAULT NULL,
    delay        interval    DEFAULT NULL,
    max_attempts integer     DEFAULT 20,
    unique_key   text        DEFAULT NULL,
    traceparent  text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    due     timestamptz;
    tp      text := enqueue.traceparent;
    new_id  bigint;
    was     boolean;
BEGIN
    IF enqueue.kind IS NULL OR octet_length(enqueue.kind) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'job kind must be 1..=255 bytes, got %', coalesce(octet_length(enqueue.kind), 0)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.queue IS NULL OR octet_length(enqueue.queue) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'queue name must be 1..=128 bytes, got %', coalesce(octet_length(enqueue.queue), 0)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.max_attempts IS NULL OR enqueue.max_attempts < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1, got %', enqueue.max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.unique_key IS NOT NULL AND octet_length(enqueue.unique_key) NOT BETWEEN 1 AND 512 THEN
        RAISE EXCEPTION 'unique key must be 1..=512 bytes, got %', octet_length(enqueue.unique_key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.priority IS NULL OR enqueue.priority NOT BETWEEN -32768 AND 32767 THEN
        RAISE EXCEPTION 'priority must fit in a smallint, got %', enqueue.priority
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.args IS NULL THEN
        RAISE EXCEPTION 'args must be JSON, got NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue.run_at IS NOT NULL AND enqueue.delay IS NOT NULL THEN
        RAISE EXCEPTION 'give run_at or delay, not both' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A later version than 00 may carry more fields after the first four: they are dropped, as
    -- `TraceParent::parse` does.
    IF tp IS NOT NULL AND length(tp) > 55 AND left(tp, 2) <> '00' AND substr(tp, 56, 1) = '-' THEN
        tp := left(tp, 55);
    END IF;
    IF tp IS NOT NULL AND NOT (
        tp ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND left(tp, 2) <> 'ff'
        AND substr(tp, 4, 32) <> '00000000000000000000000000000000'
        AND substr(tp, 37, 16) <> '0000000000000000'
    ) THEN
        RAISE EXCEPTION 'traceparent must be a W3C trace context `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` (lowercase, ids not all zero, version not ff)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    due := coalesce(enqueue.run_at, now() + coalesce(enqueue.delay, interval '0'));

    IF enqueue.unique_key IS NULL THEN
        INSERT INTO oncely.jobs AS j (kind, queue, args, priority, run_at, max_attempts, traceparent)
        VALUES (enqueue.kind, enqueue.queue, enqueue.args, enqueue.priority::smallint, due, enqueue.max_attempts, tp)
        RETURNING j.id, false INTO new_id, was;
    ELSE
        INSERT INTO oncely.jobs AS j (kind, queue, args, priority, run_at, max_attempts, unique_key, traceparent)
        VALUES (enqueue.kind, enqueue.queue, enqueue.args, enqueue.priority::smallint, due, enqueue.max_attempts,
                enqueue.unique_key, tp)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('available', 'running')
        DO UPDATE SET unique_key = EXCLUDED.unique_key
        RETURNING j.id, (j.xmax::text <> '0') INTO new_id, was;
    END IF;

    -- Wake the queue's workers when the new job is due now (delivered at commit; folded with
    -- identical notifications of the same transaction).
    IF NOT was AND due <= now() THEN
        PERFORM pg_notify('oncely_jobs', enqueue.queue);
    END IF;
    RETURN new_id;
END;
$$;

COMMENT ON FUNCTION oncely.enqueue(text, jsonb, text, integer, timestamptz, interval, integer, text, text) IS
    'Enqueue an oncely job in the caller''s transaction; returns its id (or the live job holding unique_key). '
    'traceparent: the W3C trace context of the enqueuing span, continued by the worker''s span for the job.';
