-- oncely: debounce. Migrations are additive: never edit this file once it has been applied.

-- A debounced job (`debounce.rs`) carries its key here while it waits: later enqueues with the key
-- replace its arguments and push its run_at back, until a maximum wait counted from its created_at.
-- Adding a nullable column without a default rewrites nothing. The length check is NOT VALID: it
-- holds for every row written from now on, without a scan of the existing table under its lock.
ALTER TABLE oncely.jobs ADD COLUMN debounce_key text;
ALTER TABLE oncely.jobs ADD CONSTRAINT jobs_debounce_key_length
    CHECK (debounce_key IS NULL OR length(debounce_key) BETWEEN 1 AND 512) NOT VALID;

-- The job a debounced enqueue merges into: the waiting (never started) job with the key, at most one
-- per (key, kind) (the advisory lock of `debounce.rs` keeps it so; the index makes it a rule). Only
-- debounced jobs that are available are indexed, so the index stays as small as the set of keys
-- waiting now and costs nothing to other jobs.
CREATE UNIQUE INDEX jobs_debounce_idx ON oncely.jobs (debounce_key, kind)
    WHERE debounce_key IS NOT NULL AND state = 'available' AND attempt = 0;
