//! External steps against a local HTTP receiver that records the idempotency keys it sees: a
//! process killed between the call and the record calls again with the same key; reconcile and
//! park behave as documented.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::core::step::{InjectedCrash, OnUnknown};
use oncely::{enqueue, get_job, handler_fn, JobArgs, JobState, NewJob};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A payment provider that deduplicates on `Idempotency-Key`, as Stripe does, and records every
/// request it receives: (method, path, key).
#[derive(Clone, Default)]
struct Provider {
    requests: Arc<Mutex<Vec<(String, String, String)>>>,
    charges: Arc<Mutex<Vec<String>>>,
}

impl Provider {
    async fn start() -> (Provider, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let p = Provider::default();
        let served = p.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let p = served.clone();
                tokio::spawn(async move { p.serve(conn).await });
            }
        });
        (p, addr)
    }

    async fn serve(&self, mut conn: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, path) =
            (first.next().unwrap_or_default().to_string(), first.next().unwrap_or_default().to_string());
        let key = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("idempotency-key"))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        self.requests.lock().unwrap().push((method.clone(), path.clone(), key.clone()));
        let (status, body) = {
            let mut charges = self.charges.lock().unwrap();
            match method.as_str() {
                "POST" => {
                    if !charges.contains(&key) {
                        charges.push(key.clone());
                    }
                    let n = charges.iter().position(|k| k == &key).unwrap() + 1;
                    ("200 OK", format!("ch_{n}"))
                }
                _ => match charges.iter().position(|k| path.ends_with(k.as_str())) {
                    Some(i) => ("200 OK", format!("ch_{}", i + 1)),
                    None => ("404 Not Found", String::new()),
                },
            }
        };
        let resp = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        let _ = conn.write_all(resp.as_bytes()).await;
    }

    fn posts(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().filter(|r| r.0 == "POST").map(|r| r.2.clone()).collect()
    }
    fn gets(&self) -> usize {
        self.requests.lock().unwrap().iter().filter(|r| r.0 == "GET").count()
    }
}

/// A minimal HTTP/1.1 client: (status, body).
async fn http(addr: &str, method: &str, path: &str, key: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect(addr).await?;
    let req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await?;
    let status = resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

#[derive(Debug, Serialize, Deserialize)]
struct Charge {
    order: i64,
    policy: String,
    provider: String,
    /// The first attempt dies after the step claimed its key and before the request left.
    #[serde(default)]
    crash_before_call: bool,
}

/// Whether a `crash_before_call` charge has crashed once already (one test sets it).
static CRASHED_BEFORE_CALL: AtomicBool = AtomicBool::new(false);
impl JobArgs for Charge {
    const KIND: &'static str = "charge";
}

fn charge_handler() -> impl oncely::Handler<Charge> {
    handler_fn(|ctx, c: Charge| async move {
        let addr = c.provider.clone();
        let policy = match c.policy.as_str() {
            "retry" => OnUnknown::RetrySameKey,
            "retry-forever" => OnUnknown::RetrySameKeyWithin(Duration::MAX),
            "park" => OnUnknown::Park,
            _ => {
                let addr = addr.clone();
                OnUnknown::reconcile(move |key: String| async move {
                    let (status, body) = http(&addr, "GET", &format!("/charges/{key}"), &key).await?;
                    Ok(if status == 200 { Some(body) } else { None })
                })
            }
        };
        let pool = ctx.pool().clone();
        let job_id = ctx.id();
        let charge: String = ctx
            .step("charge")
            .key(format!("charge:order:{}", c.order))
            .external(policy, |key| async move {
                if c.crash_before_call && !CRASHED_BEFORE_CALL.swap(true, Ordering::SeqCst) {
                    // As if the process died here: the intent is recorded, no request was sent.
                    std::panic::panic_any(InjectedCrash(oncely::core::step::Boundary {
                        job_id,
                        step: "charge".into(),
                        point: oncely::core::step::BoundaryPoint::BeforeRecord,
                    }));
                }
                let (_, body) = http(&addr, "POST", "/charges", &key).await?;
                if std::env::var_os("ONCELY_EXTERNAL_CHILD").is_some() {
                    // The child process stops here, after the call and before the record, and waits
                    // to be killed.
                    sqlx::query("INSERT INTO called VALUES (1)").execute(&pool).await?;
                    std::future::pending::<()>().await;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(body)
            })
            .await?;
        sqlx::query("INSERT INTO orders_charged VALUES ($1, $2)")
            .bind(c.order)
            .bind(charge)
            .execute(ctx.pool())
            .await?;
        Ok(())
    })
}

async fn tables(pool: &sqlx::PgPool) {
    sqlx::query("CREATE TABLE called (x int)").execute(pool).await.unwrap();
    sqlx::query("CREATE TABLE orders_charged (id bigint, charge text)").execute(pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by the external-step crash test as a child process"]
async fn external_child_worker() {
    let Ok(url) = std::env::var("ONCELY_EXTERNAL_CHILD_URL") else { return };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    run_child_worker(
        oncely::Worker::builder(pool).register(charge_handler()).queue("default", 1).lease(Duration::from_secs(1)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_killed_between_call_and_record_calls_again_with_the_same_key() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    let (provider, addr) = Provider::start().await;
    let id = enqueue(
        pool,
        NewJob::new(&Charge { order: 1, policy: "retry".into(), provider: addr, crash_before_call: false }).unwrap(),
    )
    .await
    .unwrap()
    .id;

    let mut child = spawn_child(
        concat!(module_path!(), "::external_child_worker"),
        &[("ONCELY_EXTERNAL_CHILD_URL", db.url()), ("ONCELY_EXTERNAL_CHILD", "1")],
    );
    eventually(Duration::from_secs(30), "the child to make the call", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM called").fetch_one(pool).await.unwrap();
        (n > 0).then_some(())
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let ledger_state: String = sqlx::query_scalar("SELECT state FROM oncely.ledger WHERE key = 'charge:order:1'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(ledger_state, "in_progress", "the intent was recorded before the call, the result never");

    let h = builder(db.new_pool(5).await).register(charge_handler()).queue("default", 1).build().unwrap().start();
    wait_all_finished(pool, Duration::from_secs(30)).await;
    h.shutdown().await;

    let posts = provider.posts();
    assert_eq!(posts.len(), 2, "called again after the crash");
    assert_eq!(posts[0], posts[1], "with the same idempotency key");
    assert!(posts[0].starts_with("oncely_"));
    assert_eq!(provider.charges.lock().unwrap().len(), 1, "the provider made one charge");
    let job = get_job(pool, id).await.unwrap();
    assert_eq!(job.state, JobState::Completed);
    let charged: Vec<(i64, String)> = sqlx::query_as("SELECT * FROM orders_charged").fetch_all(pool).await.unwrap();
    assert_eq!(charged, vec![(1, "ch_1".to_string())]);
}

/// Run one charge job whose first attempt crashes (in-process, injected) right after the call.
async fn crash_after_call_then_run(policy: &str) -> (TestDb, Provider, oncely::Job) {
    let db = TestDb::new().await;
    tables(db.pool()).await;
    let (provider, addr) = Provider::start().await;
    let id = enqueue(
        db.pool(),
        NewJob::new(&Charge { order: 2, policy: policy.into(), provider: addr, crash_before_call: false }).unwrap(),
    )
    .await
    .unwrap()
    .id;
    let crashed = Arc::new(AtomicBool::new(false));
    let hook: oncely::core::step::BoundaryHook = Arc::new(move |b| {
        if b.step == "charge"
            && b.point == oncely::core::step::BoundaryPoint::BeforeRecord
            && !crashed.swap(true, Ordering::SeqCst)
        {
            std::panic::panic_any(InjectedCrash(b.clone()));
        }
    });
    let h = builder(db.new_pool(5).await)
        .register(charge_handler())
        .queue("default", 1)
        .lease(Duration::from_millis(500))
        .step_hook(hook)
        .build()
        .unwrap()
        .start();
    wait_all_finished(db.pool(), Duration::from_secs(30)).await;
    h.shutdown().await;
    let job = get_job(db.pool(), id).await.unwrap();
    (db, provider, job)
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_asks_the_provider_and_records_what_it_says_without_calling_again() {
    init_tracing();
    let (db, provider, job) = crash_after_call_then_run("reconcile").await;
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));
    assert_eq!(job.errors[0].kind, oncely::core::ErrorKind::LeaseExpired, "the first attempt died mid-step");
    assert_eq!(provider.posts().len(), 1, "no second charge request");
    assert_eq!(provider.gets(), 1, "one reconciliation");
    let charged: Vec<(i64, String)> =
        sqlx::query_as("SELECT * FROM orders_charged").fetch_all(db.pool()).await.unwrap();
    assert_eq!(charged, vec![(2, "ch_1".to_string())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn park_dead_letters_the_job_for_a_person_with_the_key_to_look_up() {
    init_tracing();
    let (db, provider, job) = crash_after_call_then_run("park").await;
    assert_eq!(job.state, JobState::Dead);
    let last = job.errors.last().unwrap();
    assert!(last.message.contains("unknown") && last.message.contains("oncely_"), "{}", last.message);
    assert_eq!(provider.posts().len(), 1, "not called again");
    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM orders_charged").fetch_one(db.pool()).await.unwrap();
    assert_eq!(charged, 0);
}

/// The other answer of a reconciliation: the first attempt died after claiming the step and before
/// its request left, so the provider has no charge under the key; the reconciler says so (`None`)
/// and the call runs, once.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_that_finds_no_charge_calls_once() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    let (provider, addr) = Provider::start().await;
    let charge = Charge { order: 3, policy: "reconcile".into(), provider: addr, crash_before_call: true };
    let id = enqueue(pool, NewJob::new(&charge).unwrap()).await.unwrap().id;
    drain(&db).await;

    assert!(CRASHED_BEFORE_CALL.load(Ordering::SeqCst), "the first attempt crashed");
    let job = get_job(pool, id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));
    assert_eq!(job.errors[0].kind, oncely::core::ErrorKind::LeaseExpired, "the first attempt died mid-step");
    assert_eq!(provider.gets(), 1, "one reconciliation, which found nothing");
    let posts = provider.posts();
    assert_eq!(posts.len(), 1, "then one charge request: {posts:?}");
    assert!(posts[0].starts_with("oncely_"));
    let charged: Vec<(i64, String)> = sqlx::query_as("SELECT * FROM orders_charged").fetch_all(pool).await.unwrap();
    assert_eq!(charged, vec![(3, "ch_1".to_string())]);
}

/// The step record a holder that died mid-call leaves: in progress, lease over, no output.
async fn orphan_claim(pool: &sqlx::PgPool, key: &str) -> oncely::core::ledger::LedgerKey {
    claim_step(pool, key, Duration::ZERO).await
}

/// A step record claimed by some job for `lease`, with no output yet.
async fn claim_step(pool: &sqlx::PgPool, key: &str, lease: Duration) -> oncely::core::ledger::LedgerKey {
    claim_record(pool, "step", key, lease, None).await
}

/// Run the charge worker (no crash) until no job is left to run.
async fn drain(db: &TestDb) {
    let worker =
        builder(db.new_pool(5).await).register(charge_handler()).queue("default", 1).lease(Duration::from_millis(500));
    oncely_testkit::run_until_idle(db.pool(), worker, Duration::from_secs(30)).await;
}

/// Park is only useful if a person can finish what it started: the parked job names the ledger
/// record; retrying without settling it parks again without calling; settling it with what the
/// provider says (the charge happened) and retrying completes the job with that charge, with no
/// second request.
#[tokio::test(flavor = "multi_thread")]
async fn a_parked_step_is_settled_by_a_person_and_the_retried_job_uses_what_they_found() {
    use oncely::core::ledger::{self, LedgerKey, Resolution};
    init_tracing();
    let (db, provider, job) = crash_after_call_then_run("park").await;
    let pool = db.pool();
    assert_eq!(job.state, JobState::Dead);
    let message = &job.errors.last().unwrap().message;
    assert!(message.contains("oncely ledger resolve step 'charge:order:2'"), "{message}");
    let record = LedgerKey::new("step", "charge:order:2");
    // Parked: the lease is over and the record no longer expires, so neither cleanup nor a later
    // claim can make it look as if nothing happened.
    let (live, expires): (bool, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT lease_expires_at > now(), expires_at FROM oncely.ledger WHERE key = 'charge:order:2'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((live, expires), (false, None));

    // Not settled yet: a retry parks again, and calls nobody.
    oncely::retry_job(&mut pool.acquire().await.unwrap(), job.id).await.unwrap();
    drain(&db).await;
    assert_eq!(get_job(pool, job.id).await.unwrap().state, JobState::Dead);
    assert_eq!(provider.posts().len(), 1);

    // Bad resolutions are refused with the reason: no such record, or one a live claim holds.
    let err = ledger::resolve(pool, &LedgerKey::new("step", "charge:order:999"), &Resolution::DidNotTakeEffect)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no such record"), "{err}");
    let running = claim_step(pool, "charge:order:1000", Duration::from_secs(300)).await;
    for resolution in [Resolution::DidNotTakeEffect, Resolution::TookEffect(serde_json::json!("x"))] {
        let err = ledger::resolve(pool, &running, &resolution).await.unwrap_err();
        assert!(err.to_string().contains("live claim"), "{err}");
    }

    // The person asks the provider under the key the step used, and records what it says.
    let (status, charge) =
        http(job.args["provider"].as_str().unwrap(), "GET", &format!("/charges/{}", record.idempotency_key()), "")
            .await
            .unwrap();
    assert_eq!((status, charge.as_str()), (200, "ch_1"));
    ledger::resolve(pool, &record, &Resolution::TookEffect(serde_json::json!(charge))).await.unwrap();
    let again = ledger::resolve(pool, &record, &Resolution::DidNotTakeEffect).await.unwrap_err();
    assert!(again.to_string().contains("already completed"), "{again}");

    oncely::retry_job(&mut pool.acquire().await.unwrap(), job.id).await.unwrap();
    drain(&db).await;
    assert_eq!(get_job(pool, job.id).await.unwrap().state, JobState::Completed);
    assert_eq!(provider.posts().len(), 1, "no second charge request");
    let charged: Vec<(i64, String)> = sqlx::query_as("SELECT * FROM orders_charged").fetch_all(pool).await.unwrap();
    assert_eq!(charged, vec![(2, "ch_1".to_string())]);
}

/// The other settlement: the provider has no charge under the key, so the person clears the
/// record and the retried job makes the call.
#[tokio::test(flavor = "multi_thread")]
async fn a_parked_step_settled_as_not_done_calls_on_retry() {
    use oncely::core::ledger::{self, Resolution};
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    let (provider, addr) = Provider::start().await;
    // A claim whose holder died before its request left: in progress, lease over, no output.
    let record = orphan_claim(pool, "charge:order:4").await;
    let id = enqueue(
        pool,
        NewJob::new(&Charge { order: 4, policy: "park".into(), provider: addr, crash_before_call: false }).unwrap(),
    )
    .await
    .unwrap()
    .id;
    drain(&db).await;
    let job = get_job(pool, id).await.unwrap();
    assert_eq!(job.state, JobState::Dead, "parked: {:?}", job.errors);
    assert!(provider.posts().is_empty());

    ledger::resolve(pool, &record, &Resolution::DidNotTakeEffect).await.unwrap();
    oncely::retry_job(&mut pool.acquire().await.unwrap(), id).await.unwrap();
    drain(&db).await;
    assert_eq!(get_job(pool, id).await.unwrap().state, JobState::Completed);
    assert_eq!(provider.posts(), vec![record.idempotency_key()], "one request, under the step's key");
}

/// Callees forget idempotency keys (Stripe after 24 hours): an unknown outcome whose first call is
/// older than that is not called again under the default retry policy, which parks instead; a
/// policy for a callee that keeps keys forever still calls.
#[tokio::test(flavor = "multi_thread")]
async fn retrying_with_the_same_key_stops_where_the_callee_forgets_keys() {
    use oncely::core::ledger::LedgerKey;
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    tables(pool).await;
    let (provider, addr) = Provider::start().await;
    for (order, policy) in [(5, "retry"), (6, "retry-forever")] {
        // An intent recorded 25 hours ago whose holder died: in progress, lease over.
        let record = orphan_claim(pool, &format!("charge:order:{order}")).await;
        sqlx::query("UPDATE oncely.ledger SET created_at = now() - interval '25 hours' WHERE key = $1")
            .bind(&record.key)
            .execute(pool)
            .await
            .unwrap();
        let charge = Charge { order, policy: policy.into(), provider: addr.clone(), crash_before_call: false };
        enqueue(pool, NewJob::new(&charge).unwrap()).await.unwrap();
    }
    drain(&db).await;

    let states: Vec<(i64, String)> =
        sqlx::query_as("SELECT (args->>'order')::bigint, state::text FROM oncely.jobs ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(states, vec![(5, "dead".to_string()), (6, "completed".to_string())]);
    let dead = oncely::list_jobs(pool, &oncely::JobFilter { state: Some(JobState::Dead), ..Default::default() })
        .await
        .unwrap();
    let message = &dead[0].errors.last().unwrap().message;
    assert!(message.contains("parked") && message.contains("charge:order:5"), "{message}");
    assert_eq!(
        provider.posts(),
        vec![LedgerKey::new("step", "charge:order:6").idempotency_key()],
        "only the order whose callee keeps keys was called again"
    );
}
