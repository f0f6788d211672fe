//! A database outage must not burn attempts: the worker reaches PostgreSQL through a local TCP
//! proxy that is cut for 20 seconds (every connection dropped, new ones refused) while handlers are
//! using the database, then restored.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use oncely::worker::WorkerStats;
use oncely::{enqueue_many, handler_fn, JobState, NewJob};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A TCP proxy to PostgreSQL that can be cut (all connections dropped, new ones closed at once)
/// and restored.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Cancelled on a cut: every forwarding task drops its two sockets.
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (c, g, s) = (cut.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let token = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, generation, stop }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation.lock().unwrap().cancel();
    }
}

/// A proxy to `db`'s server and a pool of six connections through it (2 s to get one).
async fn through_proxy(db: &TestDb) -> (Proxy, sqlx::PgPool) {
    let direct = PgConnectOptions::from_str(db.url()).unwrap();
    let upstream: SocketAddr = tokio::net::lookup_host((direct.get_host(), direct.get_port()))
        .await
        .unwrap()
        .next()
        .expect("the database host resolves");
    let proxy = Proxy::start(upstream).await;
    let opts = direct.host(&proxy.addr.ip().to_string()).port(proxy.addr.port()).disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(opts)
        .await
        .unwrap();
    (proxy, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twenty_second_outage_burns_no_attempt_and_dead_letters_nothing() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    sqlx::query("CREATE TABLE outage_done (n bigint PRIMARY KEY)").execute(pool).await.unwrap();
    const JOBS: u64 = 40;
    let jobs: Vec<_> = (0..JOBS).map(|n| NewJob::new(&Noop { n }).unwrap().max_attempts(3)).collect();
    enqueue_many(pool, &jobs).await.unwrap();

    // The worker's pool goes through the proxy; the test's own pool does not.
    let (proxy, worker_pool) = through_proxy(&db).await;

    // Handlers use the database before and after a pause, so some are mid-query at the cut.
    let handler = handler_fn(|ctx, args: Noop| async move {
        sqlx::query("SELECT pg_sleep(0.3)").execute(ctx.pool()).await?;
        sqlx::query("INSERT INTO outage_done (n) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(args.n as i64)
            .execute(ctx.pool())
            .await?;
        Ok(())
    });
    let h = builder(worker_pool).register(handler).queue("default", 4).build().unwrap().start();

    eventually(Duration::from_secs(30), "a few jobs done and others running", || async {
        let done = count(pool, JobState::Completed).await;
        let running = count(pool, JobState::Running).await;
        (done >= 4 && running > 0).then_some(())
    })
    .await;
    proxy.cut();
    // The outage itself is a timed cut.
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.restore();

    wait_all_finished(pool, Duration::from_secs(120)).await;
    h.shutdown().await;

    assert_eq!(count(pool, JobState::Dead).await, 0, "{:?}", state_counts(pool).await);
    assert_eq!(count(pool, JobState::Completed).await, JOBS as i64);
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM outage_done").fetch_one(pool).await.unwrap();
    assert_eq!(done, JOBS as i64);
    // Attempts that counted: claims less the ones given back (snoozes, interruptions, lone
    // rescues). The outage counted none of them.
    let rows: Vec<(i64, i32, i32, i32, serde_json::Value)> =
        sqlx::query_as("SELECT id, attempt, snoozes, max_attempts, errors FROM oncely.jobs ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    let interrupted = rows.iter().filter(|r| r.1 > 1).count();
    assert!(interrupted > 0, "the outage cut some jobs short");
    for (id, attempt, snoozes, max_attempts, errors) in &rows {
        assert_eq!(attempt - snoozes, 1, "job {id}: the outage counted an attempt: {errors}");
        assert_eq!(*max_attempts, 3, "job {id}: the budget is not raised by claims given back");
    }
}

/// With prefetch, a job claimed ahead waits on the worker for a free slot. If the database is
/// unreachable meanwhile, the heartbeat cannot extend its lease, and by the time a slot frees the
/// lease may have expired and the job may be running elsewhere. Before it starts, a job whose lease
/// no heartbeat confirmed for two thirds of a lease is confirmed with a lease extension; here that
/// extension fails (the database is still away), so the job is dropped unrun, not started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_claimed_ahead_does_not_start_on_a_lease_the_worker_could_not_confirm() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    enqueue_many(pool, &[NewJob::new(&Noop { n: 1 }).unwrap(), NewJob::new(&Noop { n: 2 }).unwrap()]).await.unwrap();
    let (proxy, worker_pool) = through_proxy(&db).await;

    // One slot and one job claimed ahead: whichever job starts first holds the slot until released;
    // a second start would be the other job's.
    let (first, release, later) =
        (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()), Arc::new(AtomicU32::new(0)));
    let (f, r, l) = (first.clone(), release.clone(), later.clone());
    let handler = handler_fn(move |_ctx, _args: Noop| {
        let (f, r, l) = (f.clone(), r.clone(), l.clone());
        async move {
            if f.swap(true, Ordering::SeqCst) {
                l.fetch_add(1, Ordering::SeqCst);
            } else {
                r.notified().await;
            }
            Ok(())
        }
    });
    let h = builder(worker_pool)
        .register(handler)
        .queue("default", 1)
        .prefetch(1)
        .configure(|c| c.lease = Duration::from_secs(3))
        .build()
        .unwrap()
        .start();
    eventually(Duration::from_secs(30), "both jobs claimed, one of them started", || async {
        (count(pool, JobState::Running).await == 2 && first.load(Ordering::SeqCst)).then_some(())
    })
    .await;

    proxy.cut();
    // Three heartbeat rounds (a third of the lease apart) after the cut: the last one that reached
    // the database began more than two thirds of a lease ago.
    let beats = WorkerStats::get(&h.stats().heartbeats);
    eventually(Duration::from_secs(30), "three heartbeat rounds during the cut", || async {
        (WorkerStats::get(&h.stats().heartbeats) >= beats + 3).then_some(())
    })
    .await;
    release.notify_one();
    eventually(Duration::from_secs(30), "the job claimed ahead dropped or started", || async {
        (WorkerStats::get(&h.stats().abandoned) == 1 || later.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert_eq!(later.load(Ordering::SeqCst), 0, "the job claimed ahead started on an unconfirmed lease");
    assert_eq!(WorkerStats::get(&h.stats().abandoned), 1);

    proxy.restore();
    h.shutdown().await;
    assert_eq!(later.load(Ordering::SeqCst), 0);
}
