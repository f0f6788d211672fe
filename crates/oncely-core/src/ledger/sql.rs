//! The effect ledger's statements (`oncely.ledger`): claim, read, complete, extend, release,
//! resolve and expire a record. See `crate::job::sql` for how hot statements are written so their
//! plans cannot flip.

/// `$now` of the ledger statements: an injected clock for tests, else the database clock.
macro_rules! ledger_now {
    () => {
        "coalesce($8::timestamptz, now())"
    };
}

/// Claim a ledger key (`$1` namespace, `$2` key, `$3` fingerprint, `$4` owner, `$5` lease secs,
/// `$6` ttl secs or NULL, `$7` owner prefix that supersedes, `$8` now or NULL, `$9` the claimant's
/// attempt under `$7`). Inserts a new in-progress record, or takes over one that expired, whose
/// lease ran out, or whose owner is `$7` followed by an attempt number *smaller* than `$9` (an
/// earlier attempt of the same job; never a later one: a zombie attempt cannot take over from the
/// attempt that replaced it). Returns nothing when the key is held or completed: read it with
/// [`LEDGER_GET`].
pub(crate) const LEDGER_CLAIM: &str = concat!(
    r#"
INSERT INTO oncely.ledger AS l
    (namespace, key, fingerprint, state, attempt, owner, lease_expires_at, expires_at, created_at, updated_at)
VALUES ($1, $2, $3, 'in_progress', 1, $4,
        "#,
    ledger_now!(),
    r#" + make_interval(secs => $5),
        CASE WHEN $6::float8 IS NULL THEN NULL ELSE "#,
    ledger_now!(),
    r#" + make_interval(secs => $6) END,
        "#,
    ledger_now!(),
    ", ",
    ledger_now!(),
    r#")
ON CONFLICT (namespace, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint,
    state = 'in_progress',
    attempt = l.attempt + 1,
    owner = EXCLUDED.owner,
    lease_expires_at = EXCLUDED.lease_expires_at,
    expires_at = EXCLUDED.expires_at,
    output = NULL,
    previous_owner = CASE WHEN l.expires_at <= "#,
    ledger_now!(),
    r#" THEN NULL ELSE l.owner END,
    created_at = CASE WHEN l.expires_at <= "#,
    ledger_now!(),
    r#" THEN EXCLUDED.created_at ELSE l.created_at END,
    updated_at = EXCLUDED.updated_at
WHERE l.expires_at <= "#,
    ledger_now!(),
    r#"
   OR (l.state = 'in_progress'
       AND l.fingerprint IS NOT DISTINCT FROM EXCLUDED.fingerprint
       AND (l.lease_expires_at <= "#,
    ledger_now!(),
    r#"
            OR ($7::text IS NOT NULL AND starts_with(l.owner, $7)
                AND CASE WHEN substr(l.owner, length($7) + 1) ~ '^[0-9]{1,18}$'
                         THEN substr(l.owner, length($7) + 1)::bigint < $9::bigint
                         ELSE false END)))
RETURNING attempt, previous_owner,
          greatest(extract(epoch FROM "#,
    ledger_now!(),
    r#" - created_at), 0)::float8 AS intent_age
"#
);

/// Read a ledger record as of `$3` (now when NULL): its state, fingerprint, output and the seconds
/// left on its lease; an expired record reads as absent.
pub(crate) const LEDGER_GET: &str = r#"
SELECT state, fingerprint, output, owner, attempt,
       greatest(extract(epoch FROM lease_expires_at - coalesce($3::timestamptz, now())), 0)::float8 AS lease_left
FROM oncely.ledger
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > coalesce($3::timestamptz, now()))
"#;

/// Record the output of claim `$3` of a key; `$5` replaces the expiry (seconds from now) when set.
pub(crate) const LEDGER_COMPLETE: &str = r#"
UPDATE oncely.ledger
SET state = 'completed', output = $4, lease_expires_at = NULL, updated_at = now(),
    expires_at = CASE WHEN $5::float8 IS NULL THEN expires_at ELSE now() + make_interval(secs => $5) END
WHERE namespace = $1 AND key = $2 AND attempt = $3 AND state = 'in_progress'
RETURNING attempt
"#;

/// Extend the lease of in-progress claim `$3` by `$4` seconds from now.
pub(crate) const LEDGER_EXTEND: &str = r#"
UPDATE oncely.ledger
SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
WHERE namespace = $1 AND key = $2 AND attempt = $3 AND state = 'in_progress'
RETURNING attempt
"#;

/// Forget claim `$3` of a key that recorded nothing, so the next claimant runs from scratch.
pub(crate) const LEDGER_RELEASE: &str = r#"
DELETE FROM oncely.ledger
WHERE namespace = $1 AND key = $2 AND attempt = $3 AND state = 'in_progress'
"#;

/// The tail of both resolutions: whether the record was resolved, and if not, what it looked
/// like (a data-modifying CTE's outer query sees the record as it was before).
macro_rules! ledger_resolve_report {
    () => {
        r#")
SELECT (SELECT count(*) FROM resolved) AS resolved, l.state AS state, l.lease_expires_at > now() AS live
FROM (SELECT 1) AS one LEFT JOIN oncely.ledger l ON l.namespace = $1 AND l.key = $2
"#
    };
}

/// Resolve by hand an in-progress record nobody holds: record output `$3` as its result. A record
/// with a TTL keeps one as long, counted from now.
pub(crate) const LEDGER_RESOLVE_TOOK_EFFECT: &str = concat!(
    r#"
WITH resolved AS (
    UPDATE oncely.ledger
    SET state = 'completed', output = $3, lease_expires_at = NULL, updated_at = now(),
        expires_at = CASE WHEN expires_at IS NULL THEN NULL
                          ELSE greatest(expires_at, now() + (expires_at - created_at)) END
    WHERE namespace = $1 AND key = $2 AND state = 'in_progress'
      AND (lease_expires_at IS NULL OR lease_expires_at <= now())
    RETURNING attempt
"#,
    ledger_resolve_report!()
);

/// Resolve by hand an in-progress record nobody holds: forget it, so the next claim runs afresh.
pub(crate) const LEDGER_RESOLVE_DID_NOT_TAKE_EFFECT: &str = concat!(
    r#"
WITH resolved AS (
    DELETE FROM oncely.ledger
    WHERE namespace = $1 AND key = $2 AND state = 'in_progress'
      AND (lease_expires_at IS NULL OR lease_expires_at <= now())
    RETURNING attempt
"#,
    ledger_resolve_report!()
);

/// Delete up to `$1` expired records (never one whose lease is still live).
pub(crate) const LEDGER_DELETE_EXPIRED: &str = r#"
DELETE FROM oncely.ledger
WHERE (namespace, key) IN (
    SELECT namespace, key FROM oncely.ledger
    WHERE expires_at <= now() AND (state = 'completed' OR lease_expires_at <= now())
    LIMIT $1
)
"#;

/// The `INSERT` that writes deferred step records ([`super::DeferredRecord`]): completed records
/// made without a claim, on a job's first attempt. The arguments are the placeholders of five
/// arrays: namespaces, keys, owners, outputs, expiries (seconds from now, NULL: forever) and
/// start times (`created_at`). Keys are inserted in order, so two batches over the same keys
/// cannot deadlock. A key
/// that already has a record (another attempt's claim or result) keeps it.
macro_rules! ledger_record_many {
    ($ns:literal, $key:literal, $owner:literal, $output:literal, $ttl:literal, $at:literal) => {
        concat!(
            "INSERT INTO oncely.ledger AS l (namespace, key, state, attempt, owner, output, expires_at, created_at, updated_at)
SELECT r.namespace, r.key, 'completed', 1, r.owner, r.output,
       CASE WHEN r.ttl IS NULL THEN NULL ELSE now() + make_interval(secs => r.ttl) END, r.at, now()
FROM unnest(",
            $ns,
            "::text[], ",
            $key,
            "::text[], ",
            $owner,
            "::text[], ",
            $output,
            "::jsonb[], ",
            $ttl,
            "::float8[], ",
            $at,
            "::timestamptz[]) AS r(namespace, key, owner, output, ttl, at)
ORDER BY r.namespace, r.key
ON CONFLICT (namespace, key) DO NOTHING"
        )
    };
}
pub(crate) use ledger_record_many;

/// Write deferred step records (`$1`–`$6`); returns the namespaces and keys written.
pub(crate) const LEDGER_RECORD_BATCH: &str =
    concat!(ledger_record_many!("$1", "$2", "$3", "$4", "$5", "$6"), "\nRETURNING l.namespace, l.key");
