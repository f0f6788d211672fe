-- oncely: the SQL publish API. Migrations are additive: never edit this file once it has been
-- applied.

-- oncely.publish_many: the publish statement of the Rust API (EVENT_PUBLISH_MANY in
-- crates/oncely-core/src/outbox.rs), word for word, as a function: events, their webhook
-- deliveries and delivery jobs, their function runs, event idempotency keys, NOTIFYs. ONE
-- definition of the fan-out: tests/it/sql_api.rs checks that this body is the Rust statement's
-- text, so a change to the Rust statement fails that test until a new migration replaces this
-- function with the same text. Parameters, positional ($1..$9, as bound by the Rust API):
--   topics text[], payloads jsonb[], ordering_keys text[], queues text[], max_attempts int[],
--   delivery_kind text, operational_topic_prefix text, event_keys text[], key_windows float8[]
-- Not validated here: call oncely.publish (below), which checks its input as the Rust API does.
CREATE FUNCTION oncely.publish_many(
    text[], jsonb[], text[], text[], integer[], text, text, text[], float8[]
) RETURNS TABLE (id bigint, uid uuid, duplicate boolean, deliveries bigint, runs bigint)
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $publish$
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::text[], $5::int[], $8::text[], $9::float8[])
        WITH ORDINALITY AS t(topic, payload, ordering_key, queue, max_attempts, event_key, key_window, ord)
), lock AS (
    -- A transaction lock per ordering key, taken in key order so that two batches never wait for
    -- each other crosswise. Held until the caller commits: events of one key are numbered in
    -- commit order.
    SELECT count(pg_advisory_xact_lock(hashtextextended('oncely.events/' || k, 0))) AS locked
    FROM (SELECT DISTINCT ordering_key AS k FROM input WHERE ordering_key IS NOT NULL ORDER BY 1) AS keys
), drawn AS (
    -- Ids are drawn after the locks, in input order (referenced twice, so computed once per row).
    SELECT i.*, nextval(pg_get_serial_sequence('oncely.events', 'id')) AS new_id, gen_random_uuid() AS new_uid
    FROM input i CROSS JOIN lock
), claims AS (
    -- One claim per distinct key (its first occurrence in the batch). DO UPDATE, not DO NOTHING:
    -- it waits for a concurrent publisher of the key, then locks and returns the row it committed
    -- even though this statement's snapshot cannot see it. A live key keeps its event (this one is
    -- a duplicate); an expired one is taken over.
    INSERT INTO oncely.event_keys AS k (key, event_id, event_uid, expires_at)
    SELECT DISTINCT ON (event_key) event_key, new_id, new_uid, now() + make_interval(secs => key_window)
    FROM drawn WHERE event_key IS NOT NULL ORDER BY event_key, ord
    ON CONFLICT (key) DO UPDATE SET
        event_id   = CASE WHEN k.expires_at <= now() THEN EXCLUDED.event_id ELSE k.event_id END,
        event_uid  = CASE WHEN k.expires_at <= now() THEN EXCLUDED.event_uid ELSE k.event_uid END,
        created_at = CASE WHEN k.expires_at <= now() THEN now() ELSE k.created_at END,
        expires_at = CASE WHEN k.expires_at <= now() THEN EXCLUDED.expires_at ELSE k.expires_at END
    RETURNING key, event_id, event_uid
), resolved AS (
    SELECT d.*, coalesce(c.event_id, d.new_id) AS id, coalesce(c.event_uid, d.new_uid) AS uid,
           coalesce(c.event_id <> d.new_id, false) AS duplicate
    FROM drawn d LEFT JOIN claims c ON c.key = d.event_key
), fresh AS (
    SELECT * FROM resolved WHERE NOT duplicate
), ev AS (
    INSERT INTO oncely.events (id, uid, topic, payload, ordering_key) OVERRIDING SYSTEM VALUE
    SELECT id, uid, topic, payload, ordering_key FROM fresh ORDER BY ord
    RETURNING id
), targets AS (
    SELECT f.id AS event_id, f.ordering_key, f.queue, f.max_attempts, p.id AS endpoint_id, p.ordered
    FROM fresh f
    -- '*' receives every topic except the operational ones under 'oncely.', which can name other
    -- endpoints (and so other tenants): those go only to endpoints that subscribe to them by name.
    JOIN oncely.webhook_endpoints p
      ON p.enabled AND p.topics && ARRAY[f.topic::text, CASE WHEN starts_with(f.topic, $7) THEN NULL ELSE '*' END]
), jobs AS (
    INSERT INTO oncely.jobs (kind, queue, args, max_attempts)
    SELECT $6, queue, jsonb_build_object('event_id', event_id, 'endpoint_id', endpoint_id), max_attempts
    FROM targets
    RETURNING id, (args->>'event_id')::bigint AS event_id, (args->>'endpoint_id')::bigint AS endpoint_id,
              pg_notify('oncely_jobs', queue) IS NULL AS notified
), deliveries AS (
    INSERT INTO oncely.webhook_deliveries (endpoint_id, event_id, ordering_key, job_id)
    SELECT t.endpoint_id, t.event_id, CASE WHEN t.ordered THEN t.ordering_key END, jobs.id
    FROM jobs JOIN targets t ON t.event_id = jobs.event_id AND t.endpoint_id = jobs.endpoint_id
    RETURNING event_id
), counts AS (
    SELECT event_id, count(*) AS n FROM deliveries GROUP BY event_id
), runs AS (
    -- One run per matching function subscription: a job of the function's kind carrying the event.
    -- Prefix patterns follow the endpoints' rule: 'oncely.' topics only reach patterns naming them.
    INSERT INTO oncely.jobs (kind, queue, args, max_attempts)
    SELECT s.function, s.queue,
           jsonb_build_object('trigger', jsonb_build_object('event', jsonb_build_object(
               'id', f.id, 'topic', f.topic, 'payload', f.payload, 'key', f.event_key,
               'ordering_key', f.ordering_key, 'published_at', now()))),
           s.max_attempts
    FROM fresh f
    JOIN oncely.function_subscriptions s
      ON (s.topic = f.topic
          OR (starts_with(f.topic, s.topic_prefix) AND (NOT starts_with(f.topic, $7) OR starts_with(s.topic_prefix, $7))))
     AND (s.filter IS NULL OR f.payload @> s.filter)
    RETURNING (args #>> '{trigger,event,id}')::bigint AS event_id, pg_notify('oncely_jobs', queue) IS NULL AS notified
), run_counts AS (
    SELECT event_id, count(*) AS n FROM runs GROUP BY event_id
)
SELECT r.id, r.uid, r.duplicate, coalesce(c.n, 0) AS deliveries, coalesce(rc.n, 0) AS runs
FROM resolved r
LEFT JOIN counts c ON c.event_id = r.id AND NOT r.duplicate
LEFT JOIN run_counts rc ON rc.event_id = r.id AND NOT r.duplicate
ORDER BY r.ord
$publish$;

COMMENT ON FUNCTION oncely.publish_many(text[], jsonb[], text[], text[], integer[], text, text, text[], float8[]) IS
    'The Rust API''s publish statement (outbox.rs EVENT_PUBLISH_MANY); unvalidated: call oncely.publish.';

-- oncely.publish: publish an event from SQL, in the caller's own transaction, from any language.
-- The same checks, event keys, fan-out (webhook deliveries, function runs) and NOTIFY as the Rust
-- publish (crates/oncely-core/src/outbox.rs), through the same statement (oncely.publish_many):
--   SELECT * FROM oncely.publish('invoice.paid', '{"invoice": 123}');
--   SELECT * FROM oncely.publish('invoice.paid', '{"invoice": 123}', ordering_key => 'customer:42',
--                                key => 'invoice-paid:123');
-- Returns one row: the event's id, its webhook-id (message_id), how many deliveries and function
-- runs it started, and whether its key was already used by a live event (duplicate: nothing was
-- stored, and id/message_id are the earlier event's). Bad input raises SQLSTATE 22023
-- (invalid_parameter_value) with the Rust API's message.
CREATE FUNCTION oncely.publish(
    topic        text,
    payload      jsonb    DEFAULT '{}'::jsonb,
    ordering_key text     DEFAULT NULL,
    queue        text     DEFAULT 'webhooks',
    max_attempts integer  DEFAULT 8,
    key          text     DEFAULT NULL,
    key_window   interval DEFAULT interval '24 hours'
) RETURNS TABLE (id bigint, message_id text, deliveries bigint, runs bigint, duplicate boolean)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF publish.topic IS NULL OR publish.topic !~ '^[!-~]{1,255}$' THEN
        RAISE EXCEPTION 'topic must be 1..=255 printable ASCII characters without spaces, got %',
            coalesce(quote_literal(publish.topic), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF publish.payload IS NULL THEN
        RAISE EXCEPTION 'payload must be JSON, got NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF publish.ordering_key IS NOT NULL AND octet_length(publish.ordering_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'ordering key must be 1..=255 bytes, got %', octet_length(publish.ordering_key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF publish.key IS NOT NULL AND octet_length(publish.key) NOT BETWEEN 1 AND 1024 THEN
        RAISE EXCEPTION 'event key must be 1..=1024 bytes, got %', octet_length(publish.key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF publish.key_window IS NULL OR extract(epoch FROM publish.key_window) <= 0 THEN
        RAISE EXCEPTION 'event key window must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF publish.queue IS NULL OR octet_length(publish.queue) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'queue name must be 1..=128 bytes, got %', coalesce(octet_length(publish.queue), 0)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF publish.max_attempts IS NULL OR publish.max_attempts < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1, got %', publish.max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT p.id, 'msg_' || replace(p.uid::text, '-', ''), p.deliveries, p.runs, p.duplicate
    FROM oncely.publish_many(
        ARRAY[publish.topic], ARRAY[publish.payload], ARRAY[publish.ordering_key], ARRAY[publish.queue],
        ARRAY[publish.max_attempts], 'oncely.webhook_delivery', 'oncely.', ARRAY[publish.key],
        ARRAY[extract(epoch FROM publish.key_window)::float8]) AS p;
END;
$$;

COMMENT ON FUNCTION oncely.publish(text, jsonb, text, text, integer, text, interval) IS
    'Publish an oncely event in the caller''s transaction; returns its id, message id, deliveries, runs and duplicate.';
