//! Query plans of the hot statements, and the lock order of the batched ones.
//!
//! Each hot statement (`oncely::core::HOT_STATEMENTS`) is prepared and `EXPLAIN (FORMAT JSON)`ed
//! with realistic parameters under three sets of statistics — analyzed while empty, analyzed full
//! and then draining, analyzed mid-drain — each with PostgreSQL's own choice of custom plan and
//! with `plan_cache_mode = force_generic_plan` (sqlx prepares statements, so generic plans are what
//! a worker runs after five executions). Every plan must reach its rows through the primary key or
//! the statement's intended index: no sequential scan of a large table, and no nested loop whose
//! outer side scans `oncely.jobs` (the plan that made a completion batch compare every running job
//! with every claim).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use oncely::core::lease::{self, Claim};
use oncely::{enqueue_many, NewJob};
use serde_json::Value;
use sqlx::{Connection, PgConnection};

/// Jobs in the `bench` queue, as in the user's measurement.
const JOBS: i64 = 20_000;
/// Claims per batched statement in the plans (the completer's batches reach a thousand).
const BATCH: i64 = 1000;

/// A set of statistics: what the tables hold when `ANALYZE` runs, and what changes after. Every
/// set is analyzed before the plans are read.
#[derive(Debug, Clone, Copy)]
enum Stats {
    /// `ANALYZE` on empty tables, then the data arrives (a fresh install under load).
    Empty,
    /// 20k available jobs and a few running, analyzed; then 2,500 start running (the drain
    /// begins, as after `VACUUM ANALYZE` in the user's benchmark).
    FullThenDraining,
    /// Analyzed mid-drain: most jobs running.
    MidDrain,
}

/// Fill the tables: `running` jobs running, 2,000 completed, the rest of [`JOBS`] available; ledger
/// records; webhook endpoints, events and deliveries.
async fn fill(conn: &mut PgConnection, running: i64) {
    sqlx::query(
        "INSERT INTO oncely.jobs (kind, queue, state, attempt, lease_expires_at, finished_at, worker_id)
         SELECT 'noop', 'bench',
                CASE WHEN g <= 2000 THEN 'completed' WHEN g <= 2000 + $1 THEN 'running' ELSE 'available' END,
                CASE WHEN g <= 2000 + $1 THEN 1 ELSE 0 END,
                CASE WHEN g > 2000 AND g <= 2000 + $1 THEN now() + interval '30 seconds' END,
                CASE WHEN g <= 2000 THEN now() END,
                CASE WHEN g <= 2000 + $1 THEN 'w1' END
         FROM generate_series(1, 2000 + $2) AS g",
    )
    .bind(running)
    .bind(JOBS)
    .execute(&mut *conn)
    .await
    .unwrap();
    // Keyed jobs (`flow.rs`): 100 tenants, a tenth of them running; the insert trigger makes the keys.
    sqlx::query(
        "INSERT INTO oncely.jobs (kind, queue, state, attempt, lease_expires_at, worker_id, flow_key, flow_limit)
         SELECT 'noop', 'bench', CASE WHEN g % 10 = 0 THEN 'running' ELSE 'available' END,
                CASE WHEN g % 10 = 0 THEN 1 ELSE 0 END,
                CASE WHEN g % 10 = 0 THEN now() + interval '30 seconds' END,
                CASE WHEN g % 10 = 0 THEN 'w1' END, 'tenant:' || (g % 100), 2
         FROM generate_series(1, 2000) AS g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO oncely.ledger (namespace, key, fingerprint, state, attempt, owner, lease_expires_at, output, expires_at)
         SELECT 'steps', 'job:' || g || ':compute', NULL,
                CASE WHEN g % 4 = 0 THEN 'in_progress' ELSE 'completed' END, 1, 'job:' || g || ':1',
                CASE WHEN g % 4 = 0 THEN now() + interval '30 seconds' END,
                CASE WHEN g % 4 = 0 THEN NULL ELSE '42'::jsonb END, now() + interval '1 day'
         FROM generate_series(1, 10000) AS g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO oncely.webhook_endpoints (url, topics, secret, ordered)
         SELECT 'https://example.com/hook/' || g, ARRAY['*'], 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', g % 2 = 0
         FROM generate_series(1, 50) AS g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO oncely.events (topic, payload, ordering_key)
         SELECT 'invoice.paid', '{}'::jsonb, 'customer-' || (g % 100) FROM generate_series(1, 5000) AS g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO oncely.webhook_deliveries (endpoint_id, event_id, ordering_key, job_id, delivered_at)
         SELECT p.id, e.id, CASE WHEN p.ordered THEN e.ordering_key END, e.id,
                CASE WHEN e.id % 3 = 0 THEN NULL ELSE now() END
         FROM oncely.events e CROSS JOIN oncely.webhook_endpoints p WHERE p.id <= 4",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
}

async fn analyze(conn: &mut PgConnection) {
    for table in ["jobs", "ledger", "webhook_endpoints", "events", "webhook_deliveries"] {
        sqlx::query(&format!("ANALYZE oncely.{table}")).execute(&mut *conn).await.unwrap();
    }
}

async fn set_up(conn: &mut PgConnection, stats: Stats) {
    sqlx::query(
        "TRUNCATE oncely.jobs, oncely.flow_keys, oncely.ledger, oncely.webhook_deliveries, oncely.events, oncely.webhook_endpoints \
         RESTART IDENTITY",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    match stats {
        Stats::Empty => {
            analyze(conn).await;
            fill(conn, 2500).await;
        }
        Stats::FullThenDraining => {
            fill(conn, 50).await;
            analyze(conn).await;
            sqlx::query(
                "UPDATE oncely.jobs SET state = 'running', attempt = 1, lease_expires_at = now() + interval '30 seconds',
                        worker_id = 'w1'
                 WHERE state = 'available' AND id <= 2050 + 2500",
            )
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        Stats::MidDrain => {
            fill(conn, 12_000).await;
            analyze(conn).await;
        }
    }
}

/// The `EXECUTE` arguments of each hot statement, as SQL literals, over the data of [`fill`].
fn arguments(name: &str, running: &[i64]) -> String {
    let batch: Vec<i64> = running.iter().copied().take(BATCH as usize).collect();
    // The claims arrive in no particular order.
    let mut ids = batch.clone();
    ids.reverse();
    let ids = format!("'{{{}}}'", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
    let attempts = format!("'{{{}}}'", vec!["1"; batch.len()].join(","));
    let one = running[running.len() / 2];
    match name {
        "JOB_CLAIM" => "'bench', 256, 30, 'w2', false".into(),
        "JOB_CLAIM_WINDOWED" => {
            "'bench', 256, 30, 'w2', '{5,0}', ARRAY[now() - interval '2 seconds', now() - interval '1 hour']".into()
        }
        "FLOW_KEYS_LOCK" => "'bench', 256".into(),
        "FLOW_CLAIM" => "'bench', '{tenant:1,tenant:2,tenant:3}', 256, 30, 'w2', 85".into(),
        "JOB_SET_COMPLETED_IF_RUNNING_MANY" => format!("{ids}, {attempts}"),
        "JOB_SET_COMPLETED_IF_RUNNING_MANY_RECORDING" => format!(
            "{ids}, {attempts}, '{{step,step}}', '{{job:4:b,job:4:a}}', '{{job:4:1,job:4:1}}', \
             ARRAY['1'::jsonb, '2'::jsonb], '{{NULL,86400}}', '{{2026-12-01 00:00:00+00,2026-12-01 00:00:01+00}}'"
        ),
        "JOB_EXTEND_LEASE_MANY" => format!("{ids}, {attempts}, 30"),
        "JOB_SET_FAILED_IF_RUNNING" => format!("{one}, 1, true, 5, 'error', 'boom'"),
        "JOB_SET_AVAILABLE_IF_RUNNING" => format!("{one}, 1, 0, 'shutdown', 'worker stopping'"),
        "JOB_SET_CANCELLED_IF_RUNNING" => format!("{one}, 1, 'not wanted'"),
        "JOB_RESCUE_EXPIRED" => "1000".into(),
        "LEDGER_CLAIM" => "'steps', 'job:4:compute', NULL, 'job:4:2', 30, 86400, 'job:4:', NULL, 2".into(),
        "LEDGER_GET" => "'steps', 'job:4:compute', NULL".into(),
        "LEDGER_COMPLETE" => "'steps', 'job:4:compute', 1, '42', NULL".into(),
        "LEDGER_RECORD_BATCH" => "'{steps}', '{job:4:compute}', '{job:4:1}', ARRAY['42'::jsonb], '{NULL}', \
                                  '{2026-12-01 00:00:00+00}'"
            .into(),
        "DELIVERY_RECORD_ATTEMPT" => format!("2, 3, 200, NULL, true, {one}, 1"),
        "EVENT_PUBLISH" => "'{invoice.paid}', ARRAY['{}'::jsonb], '{NULL}', '{webhooks}', '{8}', \
                                 'oncely.webhook_delivery', 'oncely.', '{NULL}', '{86400}'"
            .into(),
        other => panic!("no arguments for hot statement {other}: add them to tests/it/plans.rs"),
    }
}

/// The indexes each statement may use; any other index, or a sequential scan of a large table,
/// fails the test.
fn intended_indexes(name: &str) -> &'static [&'static str] {
    match name {
        "JOB_CLAIM" | "JOB_CLAIM_WINDOWED" => &["jobs_fetch_idx", "jobs_pkey", "pauses_pkey", "queue_limits_pkey"],
        "FLOW_KEYS_LOCK" => {
            &["flow_keys_next_idx", "flow_keys_pkey", "jobs_flow_running_idx", "jobs_flow_fetch_idx", "pauses_pkey"]
        }
        "FLOW_CLAIM" => &["flow_keys_pkey", "jobs_flow_running_idx", "jobs_flow_fetch_idx", "jobs_pkey", "pauses_pkey"],
        "JOB_RESCUE_EXPIRED" => &["jobs_lease_idx", "jobs_pkey"],
        // The completion, and the deferred step records it writes (conflicts found by the key).
        "JOB_SET_COMPLETED_IF_RUNNING_MANY_RECORDING" => &["jobs_pkey", "ledger_pkey"],
        n if n.starts_with("JOB_") => &["jobs_pkey"],
        n if n.starts_with("LEDGER_") => &["ledger_pkey"],
        // Inserts, plus lookups in the small endpoint, subscription and event-key tables (named
        // without `_MANY`: it inserts a batch, it does not lock existing rows in id order).
        "EVENT_PUBLISH" => &[
            "webhook_endpoints_topics_idx",
            "webhook_endpoints_pkey",
            "event_keys_pkey",
            "function_subscriptions_pkey",
        ],
        "DELIVERY_RECORD_ATTEMPT" => {
            &["webhook_deliveries_pkey", "webhook_deliveries_order_idx", "webhook_endpoints_pkey", "jobs_pkey"]
        }
        other => panic!("no intended indexes for hot statement {other}: add them to tests/it/plans.rs"),
    }
}

/// Tables large enough that a sequential scan of one is a plan gone wrong.
const LARGE_TABLES: [&str; 4] = ["jobs", "ledger", "webhook_deliveries", "events"];

/// Every node of a plan, depth first.
fn nodes(plan: &Value) -> Vec<&Value> {
    let mut out = vec![plan];
    for child in plan["Plans"].as_array().into_iter().flatten() {
        out.extend(nodes(child));
    }
    out
}

fn scans_jobs(plan: &Value) -> bool {
    nodes(plan).iter().any(|n| n["Relation Name"] == "jobs")
}

/// What is wrong with `plan` for statement `name`, if anything.
fn problems(name: &str, plan: &Value) -> Vec<String> {
    let allowed = intended_indexes(name);
    let mut out = Vec::new();
    for node in nodes(plan) {
        let kind = node["Node Type"].as_str().unwrap_or("?");
        let relation = node["Relation Name"].as_str().unwrap_or("");
        if kind == "Seq Scan" && LARGE_TABLES.contains(&relation) {
            out.push(format!("sequential scan of {relation}"));
        }
        if let Some(index) = node["Index Name"].as_str() {
            if !allowed.contains(&index) {
                out.push(format!("{kind} using {index} (intended: {allowed:?})"));
            }
        }
        if kind == "Nested Loop" {
            let outer = node["Plans"].as_array().and_then(|p| p.iter().find(|c| c["Parent Relationship"] == "Outer"));
            if outer.is_some_and(scans_jobs) {
                out.push("nested loop whose outer side scans oncely.jobs".into());
            }
        }
    }
    if name.ends_with("_MANY") && !locks_in_id_order(plan) {
        out.push("the batch's rows are not locked one primary-key lookup at a time in id order".into());
    }
    out
}

/// The batched shape: a nested loop whose outer side is the claims sorted by id and whose inner
/// side locks (`LockRows`) one row found through `jobs_pkey`.
fn locks_in_id_order(plan: &Value) -> bool {
    nodes(plan).iter().any(|n| {
        let children = n["Plans"].as_array().cloned().unwrap_or_default();
        let outer = children.iter().find(|c| c["Parent Relationship"] == "Outer");
        let inner = children.iter().find(|c| c["Parent Relationship"] == "Inner");
        n["Node Type"] == "Nested Loop"
            && outer.is_some_and(|o| {
                o["Node Type"] == "Sort"
                    && o["Sort Key"]
                        .as_array()
                        .is_some_and(|k| k.len() == 1 && k[0].as_str().is_some_and(|k| k.ends_with("id")))
            })
            && inner.is_some_and(|i| {
                let inner_nodes = nodes(i);
                inner_nodes.iter().any(|n| n["Node Type"] == "LockRows")
                    && inner_nodes.iter().any(|n| n["Index Name"] == "jobs_pkey")
            })
    })
}

async fn explain(conn: &mut PgConnection, name: &str, sql: &str, args: &str) -> Value {
    sqlx::query(&format!("PREPARE hot AS {sql}"))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{name} does not prepare: {e}"));
    let explained: sqlx::types::Json<Value> = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) EXECUTE hot({args})"))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{name} does not explain with ({args}): {e}"));
    sqlx::query("DEALLOCATE hot").execute(&mut *conn).await.unwrap();
    explained.0[0]["Plan"].clone()
}

/// Every plan line, for the failure message.
fn render(plan: &Value, depth: usize, out: &mut String) {
    let mut line = format!("{:indent$}-> {}", "", plan["Node Type"].as_str().unwrap_or("?"), indent = depth * 2);
    for key in ["Relation Name", "Index Name", "Index Cond", "Sort Key", "Filter", "Join Filter", "Hash Cond"] {
        if !plan[key].is_null() {
            line.push_str(&format!("  {key}: {}", plan[key]));
        }
    }
    out.push_str(&line);
    out.push('\n');
    for child in plan["Plans"].as_array().into_iter().flatten() {
        render(child, depth + 1, out);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_statements_use_the_primary_key_or_their_index_whatever_the_statistics() {
    init_tracing();
    let db = TestDb::new().await;
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for stats in [Stats::Empty, Stats::FullThenDraining, Stats::MidDrain] {
        set_up(&mut conn, stats).await;
        let running: Vec<i64> = sqlx::query_scalar("SELECT id FROM oncely.jobs WHERE state = 'running' ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert!(running.len() as i64 >= BATCH, "{stats:?}: {} running jobs", running.len());
        for mode in ["auto", "force_generic_plan"] {
            sqlx::query(&format!("SET plan_cache_mode = {mode}")).execute(&mut conn).await.unwrap();
            for &(name, sql) in oncely::core::HOT_STATEMENTS {
                let plan = explain(&mut conn, name, sql, &arguments(name, &running)).await;
                checked += 1;
                let found = problems(name, &plan);
                if !found.is_empty() {
                    let mut shown = String::new();
                    render(&plan, 0, &mut shown);
                    failures.push(format!("{name}, {stats:?}, plan_cache_mode {mode}: {found:?}\n{shown}"));
                }
            }
        }
        sqlx::query("RESET plan_cache_mode").execute(&mut conn).await.unwrap();
    }
    assert_eq!(checked, 3 * 2 * oncely::core::HOT_STATEMENTS.len());
    assert!(failures.is_empty(), "{} plans went wrong:\n\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_plan_checks_catch_the_plan_that_flipped() {
    // The completion plan the user measured: every running job (through jobs_lease_idx) joined
    // against every claim.
    let flipped = serde_json::json!({
        "Node Type": "ModifyTable", "Relation Name": "jobs",
        "Plans": [{
            "Node Type": "Nested Loop", "Parent Relationship": "Outer",
            "Plans": [
                {"Node Type": "Index Scan", "Parent Relationship": "Outer", "Relation Name": "jobs",
                 "Index Name": "jobs_lease_idx"},
                {"Node Type": "Function Scan", "Parent Relationship": "Inner"}
            ]
        }]
    });
    let found = problems("JOB_SET_COMPLETED_IF_RUNNING_MANY", &flipped);
    assert_eq!(found.len(), 3, "{found:?}");
    let seq = serde_json::json!({"Node Type": "Seq Scan", "Relation Name": "jobs"});
    assert_eq!(problems("JOB_CLAIM", &seq), vec!["sequential scan of jobs".to_string()]);
    let names: BTreeSet<&str> = oncely::core::HOT_STATEMENTS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), oncely::core::HOT_STATEMENTS.len(), "hot statement names are unique");
}

/// Two batches over the same two jobs, given in opposite orders — the heartbeat's `[a, b]` and the
/// completer's `[b, a]` — while a third transaction holds `a`. When it lets go, the heartbeat
/// batch (first in line for `a`) takes `a` and then needs `b`: a batch that had locked `b` first
/// would now wait for `a`, and PostgreSQL would report a deadlock. Locking in id order, the
/// completer batch waits for `a` without holding `b`, and both go through.
#[tokio::test(flavor = "multi_thread")]
async fn batches_over_the_same_jobs_in_opposite_orders_do_not_deadlock() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    // A busy queue, analyzed: many running jobs. (On a tiny table PostgreSQL happens to update in
    // id order anyway; with these statistics the old statements locked in the order given.)
    let jobs: Vec<NewJob> = (0..5000).map(|n| NewJob::new(&Noop { n }).unwrap()).collect();
    enqueue_many(pool, &jobs).await.unwrap();
    let jobs = lease::claim_jobs(pool, "default", 5000, "w1", Duration::from_secs(30)).await.unwrap();
    sqlx::query("ANALYZE oncely.jobs").execute(pool).await.unwrap();
    let mut claims: Vec<Claim> = jobs.iter().map(Claim::from).collect();
    claims.sort_by_key(|c| c.id.0);
    let (a, b) = (claims[0], claims[1]);

    let mut holder = PgConnection::connect(db.url()).await.unwrap();
    let mut heartbeat = PgConnection::connect(db.url()).await.unwrap();
    let mut completer = PgConnection::connect(db.url()).await.unwrap();
    let heartbeat_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut heartbeat).await.unwrap();
    let completer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut completer).await.unwrap();
    let waiting_on_a_lock = |backend: i32| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
            )
            .bind(backend)
            .fetch_one(&pool)
            .await
            .unwrap()
            .then_some(())
        }
    };

    let mut tx = holder.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM oncely.jobs WHERE id = $1 FOR UPDATE").bind(a.id).execute(&mut *tx).await.unwrap();

    let extend = tokio::spawn(async move {
        let r = lease::extend_leases(&mut heartbeat, &[a, b], Duration::from_secs(60)).await;
        (r, heartbeat)
    });
    eventually(Duration::from_secs(10), "the heartbeat batch waits for job a", || waiting_on_a_lock(heartbeat_pid))
        .await;
    let complete = tokio::spawn(async move {
        let r = lease::complete_jobs(&mut completer, &[b, a]).await;
        (r, completer)
    });
    eventually(Duration::from_secs(10), "the completer batch waits for a lock", || waiting_on_a_lock(completer_pid))
        .await;
    tx.commit().await.unwrap();

    let (extended, _) = extend.await.unwrap();
    let (completed, _) = complete.await.unwrap();
    assert_eq!(extended.expect("the heartbeat batch must not fail (deadlock?)"), Vec::<Claim>::new());
    assert_eq!(completed.expect("the completer batch must not fail (deadlock?)"), Vec::<Claim>::new());
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM oncely.jobs WHERE id = ANY($1) ORDER BY id")
        .bind(vec![a.id.0, b.id.0])
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(states, ["completed", "completed"]);
}
