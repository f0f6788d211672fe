-- oncely: child runs (ctx.invoke / ctx.invoke_all). Additive: never edit once applied.

-- A child run is an ordinary job whose parent_id names the run (job) that started it. Adding a
-- nullable column without a default rewrites nothing; plain jobs leave it NULL.
ALTER TABLE oncely.jobs ADD COLUMN parent_id bigint;

-- One row per child of a run's invoke step: (parent, step, index) is the child's identity, written
-- in the transaction that records the step and enqueues the child, so a re-executed parent finds
-- the same children and never starts one twice. The row outlives the child's job (pruning): it
-- keeps the child's final state, its output (`set_output`) and its last error.
CREATE TABLE oncely.child_runs (
    parent_id   bigint      NOT NULL,
    step        text        NOT NULL,
    idx         integer     NOT NULL CHECK (idx >= 0),
    child_id    bigint      NOT NULL UNIQUE,
    kind        text        NOT NULL,
    -- Wake the parent at the first failed child (not only when all have finished).
    fail_fast   boolean     NOT NULL,
    state       text        NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'completed', 'dead', 'cancelled')),
    output      jsonb,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (parent_id, step, idx)
);

-- Fan-in, in the transaction that finishes a child (any path: the completer, a failure, a person's
-- cancel, a cancel_on event): record the child's final state once, and wake its parent when the
-- step's last child finished, or at the first failure of a fail-fast step. The parent's check of
-- its children takes the same advisory lock before it reads them and suspends itself, so a child
-- finishing concurrently either is seen by that check or finds the parent suspended and wakes it.
--
-- A cancelled job also cancels its children that have not started (state 'available'); a running
-- child finishes its attempt (see docs/functions.md).
CREATE FUNCTION oncely.child_run_finished() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
    parent_state text;
BEGIN
    IF NEW.parent_id IS NOT NULL AND NEW.state IN ('completed', 'dead', 'cancelled') THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('oncely.children/' || NEW.parent_id, 0));
        UPDATE oncely.child_runs c
        SET state = NEW.state, finished_at = now(),
            error = CASE WHEN NEW.state = 'completed' THEN NULL
                         ELSE coalesce(NEW.errors -> -1 ->> 'message', NEW.state) END
        WHERE c.child_id = NEW.id AND c.state = 'pending'
        RETURNING c.parent_id, c.step, c.fail_fast INTO r;
        IF FOUND AND ((NEW.state <> 'completed' AND r.fail_fast) OR NOT EXISTS (
                SELECT 1 FROM oncely.child_runs c
                WHERE c.parent_id = r.parent_id AND c.step = r.step AND c.state = 'pending')) THEN
            -- A running parent checks its children under the lock held here: no wake needed.
            SELECT j.state INTO parent_state FROM oncely.jobs j WHERE j.id = r.parent_id;
            IF parent_state = 'available' THEN
                UPDATE oncely.jobs j SET run_at = now()
                WHERE j.id = r.parent_id AND j.state = 'available' AND j.run_at > now();
                IF FOUND THEN
                    PERFORM pg_notify('oncely_jobs', j.queue) FROM oncely.jobs j WHERE j.id = r.parent_id;
                END IF;
            END IF;
        END IF;
    END IF;
    IF NEW.state = 'cancelled' AND OLD.state <> 'cancelled' THEN
        UPDATE oncely.jobs j
        SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL,
            errors = j.errors || jsonb_build_array(jsonb_build_object('attempt', j.attempt, 'at', now(),
                'kind', 'error', 'message', format('cancelled: its parent run %s was cancelled', NEW.id)))
        WHERE j.id IN (SELECT c.child_id FROM oncely.child_runs c WHERE c.parent_id = NEW.id AND c.state = 'pending')
          AND j.state = 'available';
    END IF;
    RETURN NULL;
END;
$$;

-- Gated: a plain job's completion (parent_id NULL, state 'completed') does not call the function.
CREATE TRIGGER jobs_child_run_finished
    AFTER UPDATE OF state ON oncely.jobs
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL OR (NEW.state = 'cancelled' AND OLD.state <> 'cancelled'))
    EXECUTE FUNCTION oncely.child_run_finished();
