-- oncely.enqueue: enqueue a job from SQL, in the caller's own transaction, from any language.
-- The same checks, unique-key dedupe and NOTIFY as the Rust enqueue (crates/oncely-core/src/queue.rs):
--   SELECT oncely.enqueue('send_email', '{"to": "a@example.com"}');
--   SELECT oncely.enqueue('report', '{"id": 7}', queue => 'reports', unique_key => 'report:7',
--                         delay => interval '5 minutes');
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
    unique_key   text        DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    due     timestamptz;
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
    due := coalesce(enqueue.run_at, now() + coalesce(enqueue.delay, interval '0'));

    IF enqueue.unique_key IS NULL THEN
        INSERT INTO oncely.jobs AS j (kind, queue, args, priority, run_at, max_attempts)
        VALUES (enqueue.kind, enqueue.queue, enqueue.args, enqueue.priority::smallint, due, enqueue.max_attempts)
        RETURNING j.id, false INTO new_id, was;
    ELSE
        INSERT INTO oncely.jobs AS j (kind, queue, args, priority, run_at, max_attempts, unique_key)
        VALUES (enqueue.kind, enqueue.queue, enqueue.args, enqueue.priority::smallint, due, enqueue.max_attempts,
                enqueue.unique_key)
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

COMMENT ON FUNCTION oncely.enqueue(text, jsonb, text, integer, timestamptz, interval, integer, text) IS
    'Enqueue an oncely job in the caller''s transaction; returns its id (or the live job holding unique_key).';
