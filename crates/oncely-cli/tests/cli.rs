//! The `oncely` binary against a real database (a fresh one per test, from the test kit).

use std::process::Command;
use std::time::{Duration, Instant};

use oncely_core::{JobArgs, NewJob};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Ping {}
impl JobArgs for Ping {
    const KIND: &'static str = "ping";
}

struct Run {
    ok: bool,
    code: Option<i32>,
    out: String,
    err: String,
}

fn oncely(url: &str, args: &[&str]) -> Run {
    oncely_with_env(url, &[], args)
}

async fn state_in_sql(pool: &sqlx::PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM oncely.jobs WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn manages_jobs_and_refuses_bad_input_clearly() {
    let db = oncely_testkit::TestDb::new().await;
    let url = db.url();

    let r = oncely(url, &["migrate"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("0 new migrations"), "the test kit migrated already: {}", r.out);

    let id = oncely_core::enqueue(db.pool(), NewJob::new(&Ping {}).unwrap().queue("cli")).await.unwrap().id.0;
    let r = oncely(url, &["jobs", "list", "--state", "available"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.lines().any(|l| l.split_whitespace().next() == Some(&id.to_string())), "{}", r.out);
    assert!(r.out.contains("ping") && r.out.contains("cli"), "{}", r.out);

    let r = oncely(url, &["jobs", "cancel", &id.to_string()]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("cancelled"), "{}", r.out);
    let r = oncely(url, &["jobs", "show", &id.to_string()]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.lines().any(|l| l.starts_with("state:") && l.trim_end().ends_with("cancelled")), "{}", r.out);
    assert_eq!(state_in_sql(db.pool(), id).await, "cancelled");

    // Cancelling twice is refused, with the reason, on one line.
    let r = oncely(url, &["jobs", "cancel", &id.to_string()]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("is cancelled") && r.err.contains("available or running"), "{}", r.err);
    assert_eq!(r.err.trim_end().lines().count(), 1, "{}", r.err);

    let r = oncely(url, &["jobs", "retry", &id.to_string()]);
    assert!(r.ok, "{}", r.err);
    assert_eq!(state_in_sql(db.pool(), id).await, "available");
    // An available job cannot be retried.
    let r = oncely(url, &["jobs", "retry", &id.to_string()]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("retry needs dead or cancelled"), "{}", r.err);

    let r = oncely(url, &["jobs", "show", "999999"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("job 999999 not found"), "{}", r.err);

    let r = oncely(url, &["stats"]);
    assert!(r.ok, "{}", r.err);
    let row = r.out.lines().find(|l| l.starts_with("cli")).unwrap_or_else(|| panic!("{}", r.out));
    assert_eq!(row.split_whitespace().collect::<Vec<_>>(), ["cli", "1", "0", "0", "0", "0", "1"], "{}", r.out);

    let r = oncely(url, &["jobs", "list", "--state", "bogus"]);
    assert!(!r.ok);
    assert!(r.err.contains("bogus"), "{}", r.err);
    assert_eq!(r.err.trim_end().lines().count(), 1, "{}", r.err);

    let r = oncely(url, &["purge", "--older-than", "7w"]);
    assert_eq!(r.code, Some(2));
    assert!(r.err.contains("unknown unit"), "{}", r.err);
    assert_eq!(r.err.trim_end().lines().count(), 1, "{}", r.err);

    // Purge deletes a finished job once past retention, and nothing live.
    let done = oncely_core::enqueue(db.pool(), NewJob::new(&Ping {}).unwrap().queue("cli")).await.unwrap().id;
    let mut conn = db.pool().acquire().await.unwrap();
    oncely_core::cancel_job(&mut conn, done).await.unwrap();
    drop(conn);
    let r = oncely(url, &["purge"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("deleted 0 finished jobs"), "{}", r.out);
    // Finished two seconds ago, as far as retention can tell (no sleep).
    sqlx::query("UPDATE oncely.jobs SET finished_at = finished_at - interval '2 seconds' WHERE id = $1")
        .bind(done)
        .execute(db.pool())
        .await
        .unwrap();
    let r = oncely(url, &["purge", "--older-than", "1s"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("deleted 1 finished jobs"), "{}", r.out);
    assert_eq!(state_in_sql(db.pool(), id).await, "available");
}

#[test]
fn an_unreachable_database_is_one_line_and_exit_code_1() {
    let started = Instant::now();
    let r = oncely("postgres://postgres@127.0.0.1:1/none", &["stats"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.starts_with("oncely: cannot connect to the database"), "{}", r.err);
    assert_eq!(r.err.trim_end().lines().count(), 1, "{}", r.err);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread")]
async fn manages_webhook_endpoints_and_redelivers_a_dead_delivery() {
    let db = oncely_testkit::TestDb::new().await;
    let url = db.url();
    let pool = db.pool();

    let r = oncely(url, &["webhooks", "add", "http://127.0.0.1:9/hooks", "--topic", "invoice.paid"]);
    assert_eq!(r.code, Some(1), "a loopback address is refused unless allowed: {}", r.out);
    assert!(r.err.contains("private address"), "{}", r.err);
    let r = oncely(
        url,
        &["webhooks", "add", "http://127.0.0.1:9/hooks", "--topic", "invoice.paid", "--allow-private-network"],
    );
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("endpoint 1 created") && r.out.contains("whsec_"), "{}", r.out);
    let r = oncely(url, &["webhooks", "add", "ftp://nowhere", "--topic", "x"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("http:// or https://"), "{}", r.err);

    let ev = oncely_core::outbox::publish(
        pool,
        &oncely_core::outbox::Event::from_json("invoice.paid", serde_json::json!({})),
    )
    .await
    .unwrap();
    let job: i64 = sqlx::query_scalar("SELECT job_id FROM oncely.webhook_deliveries").fetch_one(pool).await.unwrap();
    // The delivery ran out of attempts.
    sqlx::query("UPDATE oncely.jobs SET state = 'dead', finished_at = now() WHERE id = $1")
        .bind(job)
        .execute(pool)
        .await
        .unwrap();

    let r = oncely(url, &["webhooks", "deliveries", "--undelivered"]);
    assert!(r.ok, "{}", r.err);
    let line = r.out.lines().find(|l| l.contains(&ev.message_id)).unwrap_or_else(|| panic!("{}", r.out));
    assert!(line.contains("dead"), "{line}");
    // The reason a delivery died (as the delivery handler records it) is shown.
    sqlx::query("UPDATE oncely.webhook_deliveries SET dead_reason = 'endpoint 1 is disabled: maintenance'")
        .execute(pool)
        .await
        .unwrap();
    let r = oncely(url, &["webhooks", "deliveries"]);
    assert!(r.out.lines().next().is_some_and(|h| h.contains("WHY")), "{}", r.out);
    let line = r.out.lines().find(|l| l.contains(&ev.message_id)).unwrap_or_else(|| panic!("{}", r.out));
    assert!(line.contains("endpoint 1 is disabled: maintenance"), "{line}");

    let r = oncely(url, &["webhooks", "redeliver", "1", &ev.id.to_string()]);
    assert!(r.ok, "{}", r.err);
    let new_job: i64 =
        sqlx::query_scalar("SELECT job_id FROM oncely.webhook_deliveries").fetch_one(pool).await.unwrap();
    assert_ne!(new_job, job);
    assert_eq!(state_in_sql(pool, new_job).await, "available");
    assert!(r.out.contains(&format!("job {new_job}")), "{}", r.out);

    let r = oncely(url, &["webhooks", "disable", "1", "--reason", "maintenance"]);
    assert!(r.ok && r.out.contains("disabled"), "{}", r.err);
    let r = oncely(url, &["webhooks", "endpoints"]);
    assert!(r.out.contains("disabled: maintenance"), "{}", r.out);
    let r = oncely(url, &["webhooks", "enable", "1"]);
    assert!(r.ok, "{}", r.err);
    let r = oncely(url, &["webhooks", "endpoints"]);
    assert!(r.out.lines().nth(1).is_some_and(|l| l.trim_end().ends_with("enabled")), "{}", r.out);
    let r = oncely(url, &["webhooks", "redeliver", "7", "1"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("not found"), "{}", r.err);
}

/// The operator's endpoint commands: add with a given secret, rotate with an overlap (shown by
/// `endpoints`), change URL and topics, redeliver dead deliveries in bulk by filter, delete.
#[tokio::test(flavor = "multi_thread")]
async fn rotates_secrets_changes_endpoints_and_redelivers_dead_deliveries_in_bulk() {
    use oncely_core::outbox::{publish, Event};
    use oncely_core::webhook::{get_endpoint, EndpointId, WebhookSecret};
    let db = oncely_testkit::TestDb::new().await;
    let url = db.url();
    let pool = db.pool();

    let given = WebhookSecret::generate();
    let r = oncely(
        url,
        &["webhooks", "add", "https://a.example.com/hooks", "--topic", "invoice.paid", "--secret", given.as_str()],
    );
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains(given.as_str()), "{}", r.out);
    assert_eq!(get_endpoint(pool, EndpointId(1)).await.unwrap().secret, given);
    let r = oncely(url, &["webhooks", "add", "https://b.example.com/hooks", "--topic", "*", "--secret", "whsec_short"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("webhook secret"), "{}", r.err);
    let r = oncely(url, &["webhooks", "add", "https://b.example.com/hooks", "--topic", "*"]);
    assert!(r.ok, "{}", r.err);

    // Rotation: both secrets sign during the overlap, and `endpoints` shows it.
    let r = oncely(url, &["webhooks", "rotate-secret", "1", "--overlap", "2h"]);
    assert!(r.ok, "{}", r.err);
    let ep = get_endpoint(pool, EndpointId(1)).await.unwrap();
    assert_ne!(ep.secret, given);
    assert_eq!(ep.previous_secret.as_ref(), Some(&given));
    assert!(r.out.contains(ep.secret.as_str()) && r.out.contains("keeps signing until"), "{}", r.out);
    let r = oncely(url, &["webhooks", "endpoints"]);
    let line = r.out.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap_or_else(|| panic!("{}", r.out));
    assert!(line.contains("until "), "{line}");
    let line = r.out.lines().find(|l| l.trim_start().starts_with("2 ")).unwrap_or_else(|| panic!("{}", r.out));
    assert!(!line.contains("until "), "{line}");
    let r = oncely(url, &["webhooks", "rotate-secret", "1", "--overlap", "0s"]);
    assert!(r.ok && r.out.contains("no longer signs"), "{} {}", r.out, r.err);
    assert!(get_endpoint(pool, EndpointId(1)).await.unwrap().previous_secret.is_none());

    // URL and topics.
    let r = oncely(
        url,
        &[
            "webhooks",
            "update",
            "1",
            "--url",
            "https://a2.example.com/in",
            "--topic",
            "invoice.paid",
            "--topic",
            "invoice.void",
        ],
    );
    assert!(r.ok, "{}", r.err);
    let ep = get_endpoint(pool, EndpointId(1)).await.unwrap();
    assert_eq!(
        (ep.url.as_str(), ep.topics.clone()),
        ("https://a2.example.com/in", vec!["invoice.paid".to_owned(), "invoice.void".to_owned()])
    );
    let r = oncely(url, &["webhooks", "update", "1", "--url", "http://10.0.0.7/in"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("private address"), "{}", r.err);
    let r = oncely(url, &["webhooks", "update", "1"]);
    assert_eq!(r.code, Some(1));
    assert_eq!(get_endpoint(pool, EndpointId(1)).await.unwrap().url, "https://a2.example.com/in");

    // Dead deliveries: two topics to endpoint 1 (both subscribed) and endpoint 2 (catch-all).
    let paid = publish(pool, &Event::from_json("invoice.paid", serde_json::json!({}))).await.unwrap();
    let void = publish(pool, &Event::from_json("invoice.void", serde_json::json!({}))).await.unwrap();
    sqlx::query("UPDATE oncely.jobs SET state = 'dead', finished_at = now()").execute(pool).await.unwrap();
    let jobs_of = |endpoint: i64| {
        sqlx::query_scalar::<_, i64>(
            "SELECT job_id FROM oncely.webhook_deliveries WHERE endpoint_id = $1 ORDER BY event_id",
        )
        .bind(endpoint)
        .fetch_all(pool)
    };
    let before = (jobs_of(1).await.unwrap(), jobs_of(2).await.unwrap());
    // Nothing in the future window.
    let r = oncely(url, &["webhooks", "redeliver-dead", "--since", "2999-01-01T00:00:00Z"]);
    assert!(r.ok && r.out.contains("0 dead deliveries"), "{} {}", r.out, r.err);
    let r = oncely(url, &["webhooks", "redeliver-dead", "--endpoint", "1", "--topic", "invoice.void", "--since", "1h"]);
    assert!(r.ok && r.out.contains("1 dead deliveries"), "{} {}", r.out, r.err);
    let after = (jobs_of(1).await.unwrap(), jobs_of(2).await.unwrap());
    assert_eq!(after.0[0], before.0[0], "the other topic was left alone");
    assert_ne!(after.0[1], before.0[1]);
    assert_eq!(after.1, before.1, "the other endpoint was left alone");
    assert_eq!(state_in_sql(pool, after.0[1]).await, "available");
    let r = oncely(url, &["webhooks", "redeliver-dead", "--until", "1h"]);
    assert!(r.ok && r.out.contains("0 dead deliveries"), "published within the hour: {}", r.out);
    let r = oncely(url, &["webhooks", "redeliver-dead", "--since", "yesterday"]);
    assert_eq!(r.code, Some(2), "{}", r.err);

    // A disabled endpoint's dead deliveries are not redelivered, one by one or in bulk.
    let r = oncely(url, &["webhooks", "disable", "2"]);
    assert!(r.ok, "{}", r.err);
    let r = oncely(url, &["webhooks", "redeliver", "2", &paid.id.to_string()]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("disabled") && r.err.contains("enable"), "{}", r.err);
    let r = oncely(url, &["webhooks", "redeliver-dead"]);
    assert!(r.ok && r.out.contains("1 dead deliveries"), "only endpoint 1's other one: {}", r.out);
    assert_eq!(jobs_of(2).await.unwrap(), before.1);
    let _ = void;

    // Delete: the endpoint and its records go, its pending jobs are cancelled.
    let pending = jobs_of(1).await.unwrap();
    let r = oncely(url, &["webhooks", "delete", "1"]);
    assert!(r.ok && r.out.contains("2 pending deliveries cancelled"), "{} {}", r.out, r.err);
    for job in pending {
        assert_eq!(state_in_sql(pool, job).await, "cancelled");
    }
    assert!(jobs_of(1).await.unwrap().is_empty());
    let r = oncely(url, &["webhooks", "delete", "1"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("not found"), "{}", r.err);
}

/// `oncely bench`, the documented benchmark, on a tiny load: it runs every phase, checks its own
/// counts in SQL (it fails otherwise), prints every figure of the summary and drops its scratch
/// database.
#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_every_phase_and_drops_its_scratch_database() {
    let db = oncely_testkit::TestDb::new().await;
    let r = oncely(
        db.url(),
        &[
            "bench",
            "--jobs",
            "400",
            "--concurrency",
            "10",
            "--latency-samples",
            "10",
            "--baseline-connections",
            "2",
            "--baseline-time",
            "200ms",
        ],
    );
    assert!(r.ok, "stdout:\n{}\nstderr:\n{}", r.out, r.err);
    // 400 / 4 one-by-one jobs in 10 rounds: 100 of each loop.
    assert!(r.out.contains("[3/7] enqueue one by one: 100 jobs"), "{}", r.out);
    assert!(r.out.contains("a plain INSERT into oncely.jobs ="), "{}", r.out);
    assert!(r.out.contains("(checked in SQL: 400 completed)"), "{}", r.out);
    for figure in
        ["enqueue one-by-one:", "where it goes:", "enqueue batched:", "processing:", "enqueue->start latency:"]
    {
        assert!(r.out.lines().any(|l| l.trim_start().starts_with(figure)), "no {figure:?} in the summary:\n{}", r.out);
    }
    let scratch = r
        .out
        .lines()
        .find_map(|l| l.strip_prefix("dropped database "))
        .unwrap_or_else(|| panic!("no scratch database dropped:\n{}", r.out))
        .trim()
        .to_owned();
    assert!(scratch.starts_with("oncely_bench_"), "{scratch}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&scratch)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(left, 0, "the scratch database {scratch} is still there");
}

/// `oncely ledger show|resolve` on an in-progress record nobody holds (what a parked step leaves).
#[tokio::test(flavor = "multi_thread")]
async fn ledger_show_and_resolve_settle_a_record_whose_outcome_is_unknown() {
    use oncely_core::ledger::{claim, ClaimOptions, LedgerKey};
    let db = oncely_testkit::TestDb::new().await;
    let url = db.url();
    let record = LedgerKey::new("step", "charge:order:7");
    let opts = ClaimOptions {
        owner: "job:1:1",
        fingerprint: None,
        lease: Duration::ZERO,
        ttl: None,
        supersedes: None,
        now: None,
        read_first: false,
    };
    claim(&mut db.pool().acquire().await.unwrap(), &record, &opts).await.unwrap();

    let r = oncely(url, &["ledger", "show", "step", "charge:order:7"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("in_progress (nobody holds it)") && r.out.contains(&record.idempotency_key()), "{}", r.out);

    // Neither or both settlements is a usage error; bad JSON is refused before touching anything.
    assert_eq!(oncely(url, &["ledger", "resolve", "step", "charge:order:7"]).code, Some(2));
    let both =
        oncely(url, &["ledger", "resolve", "step", "charge:order:7", "--took-effect", "1", "--did-not-take-effect"]);
    assert_eq!(both.code, Some(2), "{}", both.err);
    let bad = oncely(url, &["ledger", "resolve", "step", "charge:order:7", "--took-effect", "ch_1"]);
    assert_eq!(bad.code, Some(1));
    assert!(bad.err.contains("as JSON"), "{}", bad.err);
    let missing = oncely(url, &["ledger", "resolve", "step", "nope", "--did-not-take-effect"]);
    assert_eq!(missing.code, Some(1));
    assert!(missing.err.contains("no such record"), "{}", missing.err);

    let r = oncely(url, &["ledger", "resolve", "step", "charge:order:7", "--took-effect", r#""ch_1""#]);
    assert!(r.ok, "{}", r.err);
    let (state, output): (String, serde_json::Value) = sqlx::query_as(
        "SELECT state::text, output FROM oncely.ledger WHERE namespace = 'step' AND key = 'charge:order:7'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), output), ("completed", serde_json::json!("ch_1")));
    let again = oncely(url, &["ledger", "resolve", "step", "charge:order:7", "--did-not-take-effect"]);
    assert_eq!(again.code, Some(1));
    assert!(again.err.contains("already completed"), "{}", again.err);
    let r = oncely(url, &["ledger", "show", "step", "charge:order:7"]);
    assert!(r.out.contains("completed") && r.out.contains(r#""ch_1""#) && r.out.contains("never"), "{}", r.out);
}

/// `oncely migrate` on a database whose application applied its own sqlx migration first: oncely's
/// history goes to `oncely._migrations`, and the application's migrator keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_leaves_the_applications_sqlx_history_alone() {
    let db = oncely_testkit::TestDb::new().await;
    let url = db.url();
    sqlx::raw_sql("DROP SCHEMA oncely CASCADE").execute(db.pool()).await.unwrap();
    let dir = std::env::temp_dir().join(format!("oncely-cli-app-migrations-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("20250101000000_users.sql"), "CREATE TABLE app_users (id bigint PRIMARY KEY);").unwrap();
    let app = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    app.run(db.pool()).await.unwrap();

    let r = oncely(url, &["migrate"]);
    assert!(r.ok, "{}", r.err);
    let all = oncely_core::MIGRATOR.iter().count();
    assert!(r.out.contains(&format!("{all} new migrations applied, {all} in all")), "{}", r.out);
    app.run(db.pool()).await.expect("the application's migrator still works");
    let r = oncely(url, &["migrate"]);
    assert!(r.ok && r.out.contains("0 new migrations"), "{}{}", r.out, r.err);
    let app_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations").fetch_one(db.pool()).await.unwrap();
    assert_eq!(app_rows, 1, "only the application's row");
    let _ = std::fs::remove_dir_all(&dir);
}

fn oncely_with_env(url: &str, env: &[(&str, &str)], args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_oncely"))
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .arg("--database-url")
        .arg(url)
        .args(args)
        .output()
        .expect("the oncely binary runs");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into(),
        err: String::from_utf8_lossy(&out.stderr).into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reencrypt_secrets_seals_every_endpoint_under_the_key_ring_in_the_environment() {
    use oncely_core::webhook::{create_endpoint, NewEndpoint};
    let db = oncely_testkit::TestDb::new().await;
    let (url, pool) = (db.url(), db.pool());
    let given = create_endpoint(pool, &NewEndpoint::new("https://a.example.com/hooks", ["*"])).await.unwrap();
    create_endpoint(pool, &NewEndpoint::new("https://b.example.com/hooks", ["*"])).await.unwrap();
    let columns = || async {
        sqlx::query_scalar::<_, String>("SELECT secret FROM oncely.webhook_endpoints ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    assert_eq!(columns().await[0], given.secret.as_str(), "plain text before");

    let r = oncely(url, &["webhooks", "reencrypt-secrets"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("ONCELY_SECRET_KEYS"), "{}", r.err);
    let r = oncely_with_env(url, &[("ONCELY_SECRET_KEYS", "k1:not-base64!")], &["webhooks", "endpoints"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("not standard base64"), "{}", r.err);

    // 32 bytes of 5, in base64.
    let ring = "k1:BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=".to_owned();
    let env = [("ONCELY_SECRET_KEYS", ring.as_str())];
    let r = oncely_with_env(url, &env, &["webhooks", "reencrypt-secrets"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("of 2 endpoint(s)"), "{}", r.out);
    let r = oncely_with_env(url, &env, &["webhooks", "add", "https://c.example.com/hooks", "--topic", "*"]);
    assert!(r.ok, "{}", r.err);
    let stored = columns().await;
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|s| s.starts_with("enc:v1:k1:") && !s.contains("whsec_")), "{stored:?}");
    let r = oncely_with_env(url, &env, &["webhooks", "endpoints"]);
    assert!(r.ok && r.out.contains("c.example.com"), "{} {}", r.out, r.err);

    // Without the key, the secrets cannot be read, and the error says which key is missing.
    let r = oncely(url, &["webhooks", "endpoints"]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("`k1`") && r.err.contains("ONCELY_SECRET_KEYS"), "{}", r.err);
}
