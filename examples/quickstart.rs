//! Quick start: enqueue jobs inside a business transaction, run a worker until they are done.
//!
//! Run: `scripts/with-postgres cargo run --example quickstart`
//! (uses `DATABASE_URL`, else the local server, else a throwaway cluster).
#![allow(clippy::print_stdout)]

use std::time::Duration;

use oncely::core::InsertOpts;
use oncely::{enqueue, get_job, handler_fn, JobArgs, JobState, NewJob, Outcome, Worker};
use serde::{Deserialize, Serialize};

/// Send a welcome email to a new user.
#[derive(Debug, Serialize, Deserialize)]
struct SendWelcomeEmail {
    user_id: i64,
}

impl JobArgs for SendWelcomeEmail {
    const KIND: &'static str = "send_welcome_email";
    // Declared once for the kind, not at every enqueue site.
    fn insert_opts() -> InsertOpts {
        InsertOpts::new().queue("quickstart").max_attempts(5)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())).init();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| oncely::testkit::DEFAULT_DATABASE_URL.into());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await?;
    oncely::migrate(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS quickstart_users (id bigserial PRIMARY KEY, email text NOT NULL)")
        .execute(&pool)
        .await?;

    // The user and the job commit together, or not at all.
    let mut tx = pool.begin().await?;
    let user_id: i64 = sqlx::query_scalar("INSERT INTO quickstart_users (email) VALUES ($1) RETURNING id")
        .bind("ada@example.com")
        .fetch_one(&mut *tx)
        .await?;
    let job = NewJob::new(&SendWelcomeEmail { user_id })?.unique_key(format!("welcome:{user_id}"));
    let first = enqueue(&mut *tx, job.clone()).await?;
    // A double-click enqueues again: the unique key returns the same job.
    let second = enqueue(&mut *tx, job).await?;
    tx.commit().await?;
    assert_eq!(first.id, second.id);

    let worker = Worker::builder(pool.clone())
        .register(handler_fn(|ctx, args: SendWelcomeEmail| async move {
            // Fail the first attempt to show a durable retry.
            if ctx.attempt() == 1 {
                return Err(Outcome::retry_after("mail server busy", Duration::from_millis(200)));
            }
            tracing::info!(user_id = args.user_id, attempt = ctx.attempt(), "welcome email sent");
            Ok(())
        }))
        .queue("quickstart", 4)
        .build()?;
    let handle = worker.start();
    // SIGTERM or Ctrl-C: stop claiming, let in-flight jobs finish (30 s by default), release the rest.
    let on_signal = handle.clone();
    tokio::spawn(async move { on_signal.shutdown_on_signal().await });

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let job = get_job(&pool, first.id).await?;
        if job.state.is_finished() || std::time::Instant::now() > deadline {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    handle.shutdown().await;

    println!(
        "user {user_id}: job {} enqueued twice, stored once (second enqueue existing={})",
        first.id, second.existing
    );
    println!(
        "job {}: state {}, attempts {}, errors {:?}",
        job.id,
        job.state,
        job.attempt,
        job.errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>()
    );
    if job.state != JobState::Completed || job.attempt != 2 {
        return Err(format!("expected completed after 2 attempts, got {} after {}", job.state, job.attempt).into());
    }
    println!("ok");
    Ok(())
}
