//! The report pipeline, event-driven, with crashes injected at random step boundaries.
//!
//! ```text
//! scripts/with-postgres cargo run --example report_events -- [--reports 100] [--users 5]
//!     [--duplicate-every 10] [--crash-probability 0.02]
//! ```
//!
//! - Each report request is a business write that publishes `report.requested` in the same
//!   transaction (with an event key: a request sent twice is published once).
//! - The function `generate-report` runs on that event: it generates the report (a memoized step),
//!   marks the report ready and publishes `report.ready` in one transactional step, then waits
//!   (durably, holding no worker slot) for `report.approved` with the same `report_id`, for at most
//!   3 seconds. An approved report's tokens are counted into the user's usage once per report (a
//!   business-key step); an unapproved one (every 7th, which this program never approves) expires.
//! - An approver publishes `report.approved` for each ready report, racing the runs' waits.
//! - `report.ready` is delivered as a signed webhook to a local receiver.
//! - The cron function `settle-usage` runs nightly (`0 0 * * *`, UTC) on a clock this program moves
//!   to midnight once every report is ready, and records the period's total once.
//!
//! Workers abandon attempts at random step boundaries (`--crash-probability`), as a killed process
//! would; the jobs are rescued when their leases expire. The summary says whether every count is
//! exact.
#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use clap::Parser;
use oncely::core::webhook::{create_endpoint, NewEndpoint};
use oncely::function::{Function, Trigger};
use oncely::outbox::{publish, Event};
use oncely::step::{Boundary, InjectedCrash};
use oncely::worker::flow::EventMatch;
use oncely::{HandlerResult, JobContext, Worker};
use oncely_webhooks::{DeliveryConfig, HttpTransport, Transport, WebhookDelivery};
use rand::Rng;
use sqlx::PgPool;

const PERIOD: &str = "2026-11";
/// How long a report waits for its approval before it expires unbilled.
const APPROVAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Every `UNAPPROVED`-th report is never approved: it expires after [`APPROVAL_TIMEOUT`].
const UNAPPROVED: i64 = 7;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Reports requested.
    #[arg(long, default_value_t = 100)]
    reports: i64,
    /// Users the reports belong to.
    #[arg(long, default_value_t = 5)]
    users: i64,
    /// Send every n-th request twice (0: none); the event key makes the second a no-op.
    #[arg(long, default_value_t = 10)]
    duplicate_every: i64,
    /// Probability that an attempt is abandoned at each step boundary.
    #[arg(long, default_value_t = 0.02)]
    crash_probability: f64,
}

#[derive(Debug, serde::Deserialize)]
struct ReportRequested {
    report_id: i64,
    user_id: i64,
}

fn tokens_for(report_id: i64) -> i64 {
    100 + (report_id * 7919) % 900
}

async fn generate(ctx: JobContext, trigger: Trigger<ReportRequested>) -> HandlerResult {
    let Trigger::Event(event) = trigger else { return Err(oncely::Outcome::fail("expected report.requested")) };
    let ReportRequested { report_id, user_id } = event.payload;
    let tokens: i64 =
        ctx.step("generate").run(|| async move { Ok::<_, std::io::Error>(tokens_for(report_id)) }).await?;
    ctx.step("mark_ready")
        .transactional(|tx| {
            Box::pin(async move {
                sqlx::query("UPDATE reports SET status = 'ready', tokens = $2 WHERE id = $1")
                    .bind(report_id)
                    .bind(tokens)
                    .execute(&mut *tx)
                    .await?;
                let ready = Event::from_json("report.ready", serde_json::json!({ "report_id": report_id }));
                publish(&mut *tx, &ready).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await?;
    // Bill only approved reports: the run is suspended (no slot held) until `report.approved` with
    // this report's id is published, or the timeout passes. The approver may approve as soon as the
    // report is ready, before this wait is registered (sooner still when a crash delays this
    // attempt): the look-back counts such approvals too.
    let approved = ctx
        .wait_for_event("approval", "report.approved", EventMatch::field("report_id"), APPROVAL_TIMEOUT)
        .look_back(Duration::from_secs(600))
        .await?;
    if approved.is_none() {
        ctx.step("expire")
            .transactional(|tx| {
                Box::pin(async move {
                    sqlx::query("UPDATE reports SET status = 'expired' WHERE id = $1")
                        .bind(report_id)
                        .execute(&mut *tx)
                        .await?;
                    Ok::<_, sqlx::Error>(())
                })
            })
            .await?;
        return Ok(());
    }
    ctx.step("count_usage")
        .key(format!("usage:report:{report_id}"))
        .transactional(|tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO usage (user_id, period, tokens) VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id, period) DO UPDATE SET tokens = usage.tokens + EXCLUDED.tokens",
                )
                .bind(user_id)
                .bind(PERIOD)
                .bind(tokens)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE reports SET status = 'billed' WHERE id = $1")
                    .bind(report_id)
                    .execute(&mut *tx)
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await?;
    Ok(())
}

async fn settle(ctx: JobContext, trigger: Trigger) -> HandlerResult {
    let tick = trigger.tick().ok_or_else(|| oncely::Outcome::fail("expected a cron tick"))?.clone();
    ctx.step("settle")
        .transactional(|tx| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO settlements (period, tick, tokens) \
                     SELECT $1, $2, coalesce(sum(tokens), 0)::bigint FROM usage WHERE period = $1",
                )
                .bind(PERIOD)
                .bind(tick.at)
                .execute(&mut *tx)
                .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await?;
    Ok(())
}

/// A webhook receiver counting distinct `webhook-id`s and requests.
async fn receiver() -> std::io::Result<(String, Arc<Mutex<(HashSet<String>, u64)>>)> {
    let seen: Arc<Mutex<(HashSet<String>, u64)>> = Arc::default();
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: http::HeaderMap| {
            let state = state.clone();
            async move {
                let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let mut s = state.lock().expect("receiver lock");
                s.0.insert(id);
                s.1 += 1;
                http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, seen))
}

async fn count(pool: &PgPool, sql: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(sql).fetch_one(pool).await
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into())).init();
    // Injected crashes are panics the worker catches; keep them off the terminal.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<InjectedCrash>().is_none() {
            default_hook(info)
        }
    }));
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("report_events: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let db = oncely::testkit::TestDb::new().await;
    let pool = db.pool().clone();
    for ddl in [
        "CREATE TABLE reports (id bigint PRIMARY KEY, user_id bigint NOT NULL, status text NOT NULL DEFAULT 'pending', tokens bigint)",
        "CREATE TABLE usage (user_id bigint NOT NULL, period text NOT NULL, tokens bigint NOT NULL, PRIMARY KEY (user_id, period))",
        "CREATE TABLE settlements (period text NOT NULL, tick timestamptz NOT NULL, tokens bigint NOT NULL)",
    ] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    let (url, seen) = receiver().await?;
    let transport = HttpTransport::new().allow_private_networks();
    create_endpoint(&pool, &NewEndpoint::new(url, ["report.ready"]).policy(transport.endpoint_policy())).await?;

    // The simulated clock of the nightly settlement: the evening before the period closes.
    let clock_ms = Arc::new(AtomicI64::new(Utc.with_ymd_and_hms(2026, 11, 30, 20, 0, 0).unwrap().timestamp_millis()));
    let read = clock_ms.clone();
    let clock: oncely::worker::Clock = Arc::new(move || Utc.timestamp_millis_opt(read.load(Ordering::SeqCst)).unwrap());
    let p = args.crash_probability;
    let hook: oncely::step::BoundaryHook = Arc::new(move |b: &Boundary| {
        if p > 0.0 && rand::rng().random_bool(p) {
            std::panic::panic_any(InjectedCrash(b.clone()));
        }
    });
    let mut workers = Vec::new();
    for _ in 0..2 {
        let worker = Worker::builder(db.new_pool(6).await)
            .function(Function::new("generate-report").on_event("report.requested"), generate)
            .function(Function::new("settle-usage").cron("0 0 * * *", "UTC"), settle)
            .register(WebhookDelivery::with_transport(DeliveryConfig::default(), transport.clone()))
            .queue("default", 4)
            .queue(oncely::outbox::DEFAULT_DELIVERY_QUEUE, 4)
            .lease(Duration::from_secs(1))
            .step_hook(hook.clone())
            .clock(clock.clone())
            .configure(|c| {
                c.poll_interval = Duration::from_millis(100);
                c.maintenance_interval = Duration::from_millis(200);
                c.scheduler_interval = Duration::from_millis(100);
            })
            .build()?;
        worker.register_functions().await?;
        workers.push(worker.start());
    }

    // The business writes: a report row and its event, in one transaction per request.
    for id in 1..=args.reports {
        let times = if args.duplicate_every > 0 && id % args.duplicate_every == 0 { 2 } else { 1 };
        for _ in 0..times {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO reports (id, user_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
                .bind(id)
                .bind(id % args.users)
                .execute(&mut *tx)
                .await?;
            let event = Event::from_json(
                "report.requested",
                serde_json::json!({ "report_id": id, "user_id": id % args.users }),
            )
            .key(format!("report:{id}:requested"));
            publish(&mut *tx, &event).await?;
            tx.commit().await?;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let wait = |sql: &'static str, want: i64| {
        let pool = pool.clone();
        async move {
            while count(&pool, sql).await? < want {
                if std::time::Instant::now() > deadline {
                    return Err::<(), Box<dyn std::error::Error + Send + Sync>>(format!("timed out on: {sql}").into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
    };
    // The approver: approves every ready report but every UNAPPROVED-th, as soon as it is ready.
    let approver = {
        let pool = pool.clone();
        let reports = args.reports;
        tokio::spawn(async move {
            let mut approved = HashSet::new();
            while (approved.len() as i64) < reports - reports / UNAPPROVED {
                let ready: Vec<i64> =
                    sqlx::query_scalar("SELECT id FROM reports WHERE status <> 'pending' ORDER BY id")
                        .fetch_all(&pool)
                        .await?;
                for id in ready {
                    if id % UNAPPROVED != 0 && approved.insert(id) {
                        let event = Event::from_json("report.approved", serde_json::json!({ "report_id": id }));
                        publish(&pool, &event).await?;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    };
    wait("SELECT count(*) FROM reports WHERE status IN ('billed', 'expired')", args.reports).await?;
    approver.await??;
    // Midnight: the period closes and the nightly settlement runs once.
    clock_ms.store(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap().timestamp_millis(), Ordering::SeqCst);
    wait("SELECT count(*) FROM settlements", 1).await?;
    wait("SELECT count(*) FROM oncely.webhook_deliveries WHERE delivered_at IS NOT NULL", args.reports).await?;
    wait("SELECT 1 - least(count(*), 1) FROM oncely.jobs WHERE state IN ('available', 'running')", 1).await?;
    for w in &workers {
        w.shutdown().await;
    }

    let expected: i64 = (1..=args.reports).filter(|id| id % UNAPPROVED != 0).map(tokens_for).sum();
    let expired = count(&pool, "SELECT count(*) FROM reports WHERE status = 'expired'").await?;
    let woken = count(&pool, "SELECT count(*) FROM oncely.event_waits WHERE event_id IS NOT NULL").await?;
    let counted = count(&pool, "SELECT coalesce(sum(tokens), 0)::bigint FROM usage").await?;
    let requested = count(&pool, "SELECT count(*) FROM oncely.events WHERE topic = 'report.requested'").await?;
    let runs = count(&pool, "SELECT count(*) FROM oncely.jobs WHERE kind = 'generate-report'").await?;
    let ready_events = count(&pool, "SELECT count(*) FROM oncely.events WHERE topic = 'report.ready'").await?;
    let settlements: Vec<(i64,)> = sqlx::query_as("SELECT tokens FROM settlements").fetch_all(&pool).await?;
    let (webhook_ids, webhook_posts) = {
        let s = seen.lock().expect("receiver lock");
        (s.0.len() as i64, s.1)
    };
    let rescued = count(&pool, "SELECT count(*) FROM oncely.jobs WHERE jsonb_array_length(errors) > 0").await?;
    println!(
        "reports requested:         {} (+{} duplicate requests)",
        args.reports,
        if args.duplicate_every > 0 { args.reports / args.duplicate_every } else { 0 }
    );
    println!("report.requested events:   {requested}");
    println!("generate-report runs:      {runs}");
    println!("report.ready events:       {ready_events}");
    println!("webhooks received:         {webhook_ids} distinct ids in {webhook_posts} requests");
    println!("runs interrupted at least once: {rescued}");
    println!("approved and billed:       {woken} (expired unapproved: {expired})");
    println!("tokens expected:           {expected}");
    println!("tokens counted:            {counted}");
    println!("nightly settlements:       {} ({:?} tokens)", settlements.len(), settlements.first().map(|s| s.0));
    let exact = requested == args.reports
        && runs == args.reports
        && ready_events == args.reports
        && webhook_ids == args.reports
        && counted == expected
        && expired == args.reports / UNAPPROVED
        && woken == args.reports - args.reports / UNAPPROVED
        && settlements == [(expected,)];
    println!("{}", if exact { "EXACT: every count matches" } else { "MISMATCH" });
    Ok(exact)
}
