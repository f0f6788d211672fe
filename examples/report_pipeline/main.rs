//! The report-generation pipeline, end to end, with failures you can inject.
//!
//! ```text
//! scripts/with-postgres cargo run --example report_pipeline -- [--reports 200] [--users 10]
//!     [--duplicate-every 0] [--fail-after-increment] [--crash-probability 0.0] [--keep-db]
//! ```
//!
//! The parent process creates a fresh database, inserts the reports and enqueues a job per report,
//! then runs worker child processes until every job has finished, restarting a child whenever it
//! crashes (`--crash-probability` makes children abort at random step boundaries, mid-transaction
//! included). It prints a summary a person can check: reports, expected tokens, counted tokens.
#![allow(clippy::print_stdout)]

mod pipeline;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sqlx::Connection;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Reports to generate.
    #[arg(long, default_value_t = 200)]
    reports: i64,
    /// Users the reports belong to.
    #[arg(long, default_value_t = 10)]
    users: i64,
    /// Enqueue a duplicate job for every n-th report (0: none).
    #[arg(long, default_value_t = 0)]
    duplicate_every: i64,
    /// Fail every job's first attempt right after its usage increment.
    #[arg(long)]
    fail_after_increment: bool,
    /// Probability that a worker process aborts at each step boundary.
    #[arg(long, default_value_t = 0.0)]
    crash_probability: f64,
    /// Keep the database afterwards.
    #[arg(long)]
    keep_db: bool,
    /// Use (recreate) and keep the database of this name, e.g. to open `oncely serve` on it.
    #[arg(long)]
    db_name: Option<String>,
    /// Internal: run as a worker child on this database URL.
    #[arg(long, hide = true)]
    child: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into())).init();
    let args = Args::parse();
    let result = match args.child.clone() {
        Some(url) => child(&args, &url).await,
        None => parent(&args).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("report_pipeline: {e}");
            ExitCode::from(2)
        }
    }
}

type BoxResult<T> = Result<T, pipeline::BoxError>;

async fn parent(args: &Args) -> BoxResult<bool> {
    let server = oncely::testkit::server_url();
    let name = args.db_name.clone().unwrap_or_else(|| format!("oncely_report_pipeline_{}", std::process::id()));
    let mut admin = sqlx::PgConnection::connect(&server).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await?;
    let url = oncely::testkit::url_with_database(&server, &name);
    let pool = sqlx::PgPool::connect(&url).await?;
    pipeline::setup(&pool).await?;
    pipeline::seed(&pool, args.reports, args.users, args.duplicate_every).await?;
    println!("database {name}: {} reports for {} users enqueued", args.reports, args.users);

    let mut crashes = 0;
    loop {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("--child").arg(&url).arg("--crash-probability").arg(args.crash_probability.to_string());
        if args.fail_after_increment {
            cmd.arg("--fail-after-increment");
        }
        let status = cmd.status().await?;
        if status.success() {
            break;
        }
        crashes += 1;
        println!("worker process crashed ({status}); restarting (crash {crashes})");
        if crashes > 500 {
            return Err("too many crashes".into());
        }
    }

    let summary = pipeline::summary(&pool).await?;
    let (attempts, retried): (i64, i64) = pipeline::retrying("count attempts", || {
        sqlx::query_as("SELECT coalesce(sum(attempt), 0)::bigint, count(*) FILTER (WHERE attempt > 1) FROM oncely.jobs")
            .fetch_one(&pool)
    })
    .await?;
    println!("worker crashes:   {crashes}");
    println!("job attempts:     {attempts} ({retried} jobs ran more than once)");
    println!("{summary}");
    let exact = summary.is_exact();
    println!("{}", if exact { "OK: every report counted exactly once" } else { "MISMATCH: usage is not exact" });
    pool.close().await;
    if !args.keep_db && args.db_name.is_none() {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await?;
    }
    Ok(exact)
}

async fn child(args: &Args, url: &str) -> BoxResult<bool> {
    // Lazy: a child started while the server restarts waits for it instead of exiting.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(12).connect_lazy(url)?;
    let failures = pipeline::Failures {
        fail_after_increment: args.fail_after_increment,
        crash_probability: args.crash_probability,
    };
    pipeline::work_until_done(&pool, failures, Arc::new(pipeline::Calls::default()), |c| {
        c.lease = Duration::from_secs(2);
        c.maintenance_interval = Duration::from_millis(200);
        c.poll_interval = Duration::from_millis(200);
        c.retry.base = Duration::from_millis(50);
    })
    .await?;
    pool.close().await;
    Ok(true)
}
