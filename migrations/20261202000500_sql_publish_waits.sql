-- oncely: the SQL publish API follows the Rust publish statement, which now also resolves the
-- event waits of wait_for_event and cancel_on (20261202000100_event_waits.sql). Migrations are
-- additive: never edit this file once it has been applied. Same signature and result as
-- 20261202000200_sql_publish.sql; the body is EVENT_PUBLISH_MANY's text, word for word
-- (tests/it/sql_api.rs checks it).
CREATE OR REPLACE FUNCTION oncely.publish_many(
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
), waits AS (
    -- Waiting runs (wait_for_event, cancel_on) matched by these events: resolved and woken or
    -- cancelled by a volatile function whose lookups see what committed before its locks
    -- (migrations/20261202000100_event_waits.sql). Without any wait on these topics it takes one
    -- shared lock per topic and one index lookup.
    SELECT oncely.resolve_event_waits(array_agg(id), array_agg(topic::text), array_agg(payload)) AS matched FROM fresh
)
SELECT r.id, r.uid, r.duplicate, coalesce(c.n, 0) AS deliveries, coalesce(rc.n, 0) AS runs
FROM resolved r CROSS JOIN waits
LEFT JOIN counts c ON c.event_id = r.id AND NOT r.duplicate
LEFT JOIN run_counts rc ON rc.event_id = r.id AND NOT r.duplicate
ORDER BY r.ord

$publish$;
