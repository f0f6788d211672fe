//! Behind a real PgBouncer in transaction pooling mode (`Pooler::Transaction`, docs/operations.md
//! "Behind PgBouncer").
//!
//! Each test starts its own `pgbouncer` (from PATH or /usr/sbin) on a free port, in transaction
//! mode with two server connections per database and more client connections than that, so
//! consecutive transactions of one client really land on different servers. Without a pgbouncer
//! binary the tests fail, unless `ONCELY_SKIP_PGBOUNCER=1`.
//!
//! The pooler mode is process-wide, so the worker in that mode runs in a child process (this test
//! binary run again with `--ignored --exact pgbouncer::child_process`); the parent checks the
//! database directly, and never switches its own mode.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::core::pooler::{db, Pooler};
use oncely::core::ErrorKind;
use oncely::{enqueue, enqueue_many, get_job, handler_fn, JobArgs, JobState, NewJob, Outcome};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

const LEASE: Duration = Duration::from_secs(2);
/// Jobs the drain child enqueues through the pooler.
const WORK: u32 = 320;
/// Jobs the first child claims and holds until it is killed.
const HANGING: u32 = 2;

/// A PgBouncer process in transaction pooling mode, killed on drop.
struct Bouncer {
    child: std::process::Child,
    port: u16,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory under the system temp dir, removed on drop.
    pub(super) struct Dir(pub(super) std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn pgbouncer_binary() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("pgbouncer"));
    from_path.chain([PathBuf::from("/usr/sbin/pgbouncer")]).find(|p| p.is_file())
}

impl Bouncer {
    /// Start one, or `None` when there is no binary and `ONCELY_SKIP_PGBOUNCER=1`.
    async fn start() -> Option<Bouncer> {
        let Some(bin) = pgbouncer_binary() else {
            if std::env::var("ONCELY_SKIP_PGBOUNCER").as_deref() == Ok("1") {
                eprintln!("SKIPPED: no pgbouncer binary (ONCELY_SKIP_PGBOUNCER=1)");
                return None;
            }
            panic!(
                "no pgbouncer binary on PATH or at /usr/sbin/pgbouncer: install the distribution's `pgbouncer` \
                 package (.ci/run does), or set ONCELY_SKIP_PGBOUNCER=1 to skip these tests"
            );
        };
        let dir = std::env::temp_dir().join(format!("oncely-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = tempdir::Dir(dir);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ini = dir.0.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port=5432 user=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = transaction\n\
                 default_pool_size = 2\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 200\n\
                 server_lifetime = 3600\n\
                 ignore_startup_parameters = extra_float_digits,search_path\n"
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(&bin);
        // Its log goes to stderr (it may run as another user, who could not write in `dir`).
        let log = std::fs::File::create(dir.0.join("pgbouncer.log")).unwrap();
        cmd.arg(&ini).stdout(std::process::Stdio::null()).stderr(log);
        // PgBouncer refuses to run as root unless told which user to become.
        if running_as_root() {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let bouncer = Bouncer { child, port, _dir: dir };
        let url = bouncer.url("postgres");
        eventually(Duration::from_secs(10), "pgbouncer to accept connections", || async {
            use sqlx::Connection;
            sqlx::PgConnection::connect(&url).await.ok().map(drop)
        })
        .await;
        Some(bouncer)
    }

    /// The URL of `database` through this PgBouncer.
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pool through the bouncer: more client connections than its two server connections.
async fn bouncer_pool(url: &str) -> PgPool {
    sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(url).await.unwrap()
}

#[derive(Debug, Serialize, Deserialize)]
struct Hang {
    n: u32,
}
impl JobArgs for Hang {
    const KIND: &'static str = "pgb_hang";
}

#[derive(Debug, Serialize, Deserialize)]
struct Work {
    n: u32,
}
impl JobArgs for Work {
    const KIND: &'static str = "pgb_work";
}

#[derive(Debug, Serialize, Deserialize)]
struct Follow {
    n: u32,
}
impl JobArgs for Follow {
    const KIND: &'static str = "pgb_follow";
}

/// A statement of the handler's own, pooler-safe: unnamed and in a transaction of its own.
async fn effect(pool: &PgPool, job: oncely::JobId, what: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO effects (job_id, what, pid) VALUES ($1, $2, $3)")
        .persistent(false)
        .bind(job)
        .bind(what)
        .bind(std::process::id() as i32)
        .execute(db(pool))
        .await
        .map(drop)
}

/// A tracing layer that keeps every event at WARN or above.
#[derive(Clone, Default)]
struct Caught(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Caught {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={value:?} ", field.name()));
            }
        }
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0.lock().unwrap().push((*event.metadata().level(), f.0));
    }
}

/// The child: `ONCELY_PGB_ROLE=hang` holds the `Hang` jobs until killed; `drain` enqueues the
/// work through the pooler and runs everything (maintenance on: it rescues the hung jobs), then
/// exits once all is finished, failing if anything was logged at WARN or above but the expected.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by the pgbouncer tests as a child process"]
async fn child_process() {
    let Ok(url) = std::env::var("ONCELY_PGB_URL") else { return };
    let role = std::env::var("ONCELY_PGB_ROLE").unwrap();
    let caught = Caught::default();
    {
        use tracing_subscriber::layer::SubscriberExt;
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(caught.clone()));
    }
    let pool = bouncer_pool(&url).await;
    let builder = oncely::Worker::builder(pool.clone())
        .configure(fast)
        .lease(LEASE)
        .pooler(Pooler::Transaction)
        .queue("default", 8)
        .queue("keyed", 4);
    if role == "hang" {
        // LISTEN over a direct connection of its own (the parent looks for it).
        let listen = std::env::var("ONCELY_PGB_LISTEN_URL").unwrap();
        let _h = builder
            .listen_url(listen)
            .register(handler_fn(|ctx, _a: Hang| async move {
                effect(ctx.pool(), ctx.id(), "hang-start").await?;
                std::future::pending::<()>().await;
                Ok(())
            }))
            .configure(|c| c.maintenance = false)
            .build()
            .unwrap()
            .start();
        assert_eq!(oncely::core::pooler::pooler(), Pooler::Transaction);
        std::future::pending::<()>().await;
        return;
    }

    // role == "drain"
    let memo_runs = Arc::new(AtomicU32::new(0));
    let runs = memo_runs.clone();
    let snoozed = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let worker = builder
        .register(handler_fn(|ctx, _a: Hang| async move {
            effect(ctx.pool(), ctx.id(), "hang-done").await?;
            Ok(())
        }))
        .register(handler_fn(move |ctx, w: Work| {
            let runs = runs.clone();
            let snoozed = snoozed.clone();
            async move {
                // A memoized step, a transactional step, an enqueue from the handler, a retry.
                let doubled: u32 = ctx
                    .step("memo")
                    .run(|| async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        effect(ctx.pool(), ctx.id(), "memo").await?;
                        Ok::<_, sqlx::Error>(w.n * 2)
                    })
                    .await?;
                assert_eq!(doubled, w.n * 2);
                let id = ctx.id();
                ctx.step("txn")
                    .transactional(move |tx| {
                        Box::pin(async move {
                            sqlx::query("INSERT INTO effects (job_id, what, pid) VALUES ($1, 'txn', 0)")
                                .persistent(false)
                                .bind(id)
                                .execute(&mut *tx)
                                .await?;
                            Ok::<_, sqlx::Error>(())
                        })
                    })
                    .await?;
                if w.n % 5 == 0 {
                    ctx.step("follow")
                        .run(|| async {
                            let job = NewJob::new(&Follow { n: w.n }).unwrap().unique_key(format!("follow:{}", w.n));
                            enqueue(db(ctx.pool()), job).await.map(|e| e.id.0)
                        })
                        .await?;
                }
                if w.n % 7 == 0 && ctx.attempt() == 1 {
                    return Err(Outcome::retry("first attempt fails on purpose"));
                }
                if w.n % 11 == 0 && snoozed.lock().unwrap().insert(w.n) {
                    return Err(Outcome::snooze(Duration::from_millis(20)));
                }
                Ok(())
            }
        }))
        .register(handler_fn(|ctx, _f: Follow| async move {
            let id = ctx.id();
            ctx.step("txn")
                .transactional(move |tx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO effects (job_id, what, pid) VALUES ($1, 'follow', 0)")
                            .persistent(false)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        Ok::<_, sqlx::Error>(())
                    })
                })
                .await?;
            Ok(())
        }))
        .build()
        .unwrap();
    assert_eq!(oncely::core::pooler::pooler(), Pooler::Transaction);
    let h = worker.start();

    // Enqueue through the pooler, every way: one by one on the pool, inside our own transaction,
    // a batch (unnest), a COPY-sized batch, and keyed jobs (the flow-control claim).
    let mut n = 0..WORK;
    for i in n.by_ref().take(20) {
        enqueue(db(&pool), NewJob::new(&Work { n: i }).unwrap()).await.unwrap();
    }
    let mut tx = oncely::core::txn::begin(&pool).await.unwrap();
    for i in n.by_ref().take(10) {
        enqueue(&mut *tx, NewJob::new(&Work { n: i }).unwrap()).await.unwrap();
    }
    tx.commit().await.unwrap();
    let batch: Vec<NewJob> = n.by_ref().take(10).map(|i| NewJob::new(&Work { n: i }).unwrap()).collect();
    enqueue_many(&pool, &batch).await.unwrap();
    let keyed: Vec<NewJob> = n
        .by_ref()
        .take(20)
        .map(|i| NewJob::new(&Work { n: i }).unwrap().queue("keyed").concurrency_key(format!("k{}", i % 3), Some(1)))
        .collect();
    enqueue_many(&pool, &keyed).await.unwrap();
    let copy: Vec<NewJob> = n.map(|i| NewJob::new(&Work { n: i }).unwrap()).collect();
    assert!(copy.len() >= oncely::core::queue::COPY_THRESHOLD);
    enqueue_many(&pool, &copy).await.unwrap();

    // Publish through the pooler: on the pool, and inside our own transaction.
    let event = oncely::core::outbox::Event::new("pgb.done", &serde_json::json!({ "n": 1 })).unwrap();
    oncely::core::outbox::publish(db(&pool), &event).await.unwrap();
    let mut tx = oncely::core::txn::begin(&pool).await.unwrap();
    oncely::core::outbox::publish(&mut *tx, &event).await.unwrap();
    tx.commit().await.unwrap();

    eventually(Duration::from_secs(90), "every job finished", || async {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM oncely.jobs WHERE state NOT IN ('completed', 'dead', 'cancelled')",
        )
        .persistent(false)
        .fetch_one(db(&pool))
        .await
        .unwrap();
        (pending == 0).then_some(())
    })
    .await;
    h.shutdown().await;
    assert_eq!(memo_runs.load(Ordering::SeqCst), WORK, "each memoized step ran once");
    let caught = caught.0.lock().unwrap().clone();
    let unexpected: Vec<_> = caught
        .iter()
        .filter(|(level, msg)| {
            *level == tracing::Level::ERROR
                || !(msg.contains("rescued jobs whose lease expired") || msg.contains("first attempt fails on purpose"))
        })
        .collect();
    assert!(unexpected.is_empty(), "logged through the pooler: {unexpected:#?}");
}

/// Parent side: a worker in transaction-pooling mode, through PgBouncer, listening over a direct
/// URL, is killed with SIGKILL while it holds jobs (its heartbeats having extended their leases
/// through the pooler); a second, which does not listen at all (it polls), rescues them, enqueues
/// work every way, publishes, and drains it all with memoized and transactional steps, retries,
/// snoozes and follow-up jobs: exact effect counts, nothing logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_pooling_worker_drains_and_rescues_through_pgbouncer() {
    init_tracing();
    let Some(bouncer) = Bouncer::start().await else { return };
    let tdb = TestDb::new().await;
    let pool = tdb.pool();
    sqlx::query("CREATE TABLE effects (job_id bigint NOT NULL, what text NOT NULL, pid int NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    let url = bouncer.url(tdb.name());
    let hung: Vec<NewJob> = (0..HANGING).map(|n| NewJob::new(&Hang { n }).unwrap()).collect();
    let hung: Vec<_> = enqueue_many(pool, &hung).await.unwrap().into_iter().map(|e| e.id).collect();

    let listen_url = format!("{}?application_name=oncely-pgb-listen", tdb.url().split('?').next().unwrap());
    let mut first = spawn_child(
        concat!(module_path!(), "::child_process"),
        &[("ONCELY_PGB_URL", url.as_str()), ("ONCELY_PGB_ROLE", "hang"), ("ONCELY_PGB_LISTEN_URL", &listen_url)],
    );
    let first_pid = first.id().unwrap() as i32;
    eventually(Duration::from_secs(30), "the first child to start the hanging jobs", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE what = 'hang-start' AND pid = $1")
            .bind(first_pid)
            .fetch_one(pool)
            .await
            .unwrap();
        (n == HANGING as i64).then_some(())
    })
    .await;
    // Its heartbeats extend the leases through the pooler: each lease moves past its first term.
    eventually(Duration::from_secs(30), "the hanging jobs' leases to be extended", || async {
        let extended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM oncely.jobs WHERE id = ANY($1) AND state = 'running' \
             AND lease_expires_at > attempted_at + make_interval(secs => $2)",
        )
        .bind(hung.iter().map(|id| id.0).collect::<Vec<_>>())
        .bind(LEASE.as_secs_f64() * 1.2)
        .fetch_one(pool)
        .await
        .unwrap();
        (extended == HANGING as i64).then_some(())
    })
    .await;
    // Its listener is on the direct URL, not through PgBouncer.
    eventually(Duration::from_secs(30), "the first child's LISTEN over the direct URL", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'oncely-pgb-listen' AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    first.start_kill().unwrap();
    assert!(!first.wait().await.unwrap().success());

    let second = spawn_child(
        concat!(module_path!(), "::child_process"),
        &[("ONCELY_PGB_URL", url.as_str()), ("ONCELY_PGB_ROLE", "drain")],
    );
    let status = tokio::time::timeout(Duration::from_secs(150), second.wait_with_output())
        .await
        .expect("the drain child finishes within 150 s")
        .unwrap()
        .status;
    assert!(status.success(), "the drain child failed (its stderr is above): {status}");

    // Checked directly, not through the pooler.
    for id in &hung {
        let job = get_job(pool, *id).await.unwrap();
        assert_eq!((job.state, job.attempt), (JobState::Completed, 2), "hung job {id} rescued and completed");
        assert_eq!(job.errors.first().map(|e| e.kind), Some(ErrorKind::LeaseExpired));
    }
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM oncely.jobs GROUP BY state").fetch_all(pool).await.unwrap();
    let follow = (0..WORK).filter(|n| n % 5 == 0).count() as i64;
    assert_eq!(counts, vec![("completed".to_owned(), HANGING as i64 + WORK as i64 + follow)]);
    let per_job: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT what, count(*), count(DISTINCT job_id) FROM effects GROUP BY what ORDER BY what")
            .fetch_all(pool)
            .await
            .unwrap();
    let (w, f, h) = (WORK as i64, follow, HANGING as i64);
    assert_eq!(
        per_job,
        vec![
            ("follow".to_owned(), f, f),
            ("hang-done".to_owned(), h, h),
            ("hang-start".to_owned(), h, h),
            ("memo".to_owned(), w, w),
            ("txn".to_owned(), w, w),
        ],
        "every effect exactly once per job"
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.events WHERE topic = 'pgb.done'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(events, 2, "both publishes through the pooler landed");
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM oncely.jobs WHERE kind = 'pgb_work' AND jsonb_array_length(errors) = 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(retried, (0..WORK).filter(|n| n % 7 == 0).count() as i64, "the retried jobs ran twice");
}

/// The control: the default mode (named, cached statements; autocommit on the pool) does fail
/// through the same PgBouncer, so the test above proves something.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_mode_fails_through_pgbouncer_in_transaction_mode() {
    init_tracing();
    let Some(bouncer) = Bouncer::start().await else { return };
    assert_eq!(oncely::core::pooler::pooler(), Pooler::Session, "this process never switches its mode");
    let tdb = TestDb::new().await;
    let pool = bouncer_pool(&bouncer.url(tdb.name())).await;
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                if let Err(e) = enqueue(&pool, NewJob::new(&Work { n: t * 1000 + i }).unwrap()).await {
                    return Some(e.to_string());
                }
            }
            None
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    assert!(!errors.is_empty(), "800 enqueues in the default mode all succeeded through PgBouncer");
    assert!(
        errors.iter().all(|e| e.contains("prepared statement")),
        "the default mode fails for its prepared statements: {errors:?}"
    );
}
