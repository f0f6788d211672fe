//! `oncely`: migrate the schema, inspect and manage jobs, measure throughput.
#![allow(clippy::print_stdout)]

mod bench;
mod bulk;
mod duration;
mod jobs;
mod ledger;
mod queues;
mod runs;
mod serve;
mod table;
mod webhooks;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use oncely_core::{JobFilter, JobState};

#[derive(Parser, Debug)]
#[command(
    name = "oncely",
    version,
    about = "Durable jobs on PostgreSQL: migrate, inspect and manage jobs and webhooks, benchmark"
)]
struct Cli {
    /// PostgreSQL URL, e.g. postgres://user@host:5432/db. Required; may follow the subcommand.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Apply the pending schema migrations.
    Migrate,
    /// Inspect and manage jobs.
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// Webhook endpoints and deliveries.
    Webhooks {
        #[command(subcommand)]
        cmd: WebhooksCmd,
    },
    /// Effect records: look at one, settle a parked one.
    Ledger {
        #[command(subcommand)]
        cmd: LedgerCmd,
    },
    /// Function runs: list, show (trigger and steps), re-run from a step.
    Runs {
        #[command(subcommand)]
        cmd: runs::RunsCmd,
    },
    /// Pause and resume queues or job kinds across every worker; list queues.
    Queues {
        #[command(subcommand)]
        cmd: queues::QueuesCmd,
    },
    /// Cancel, retry or delete every job that matches a filter, in batches.
    Bulk {
        #[command(subcommand)]
        cmd: bulk::BulkCmd,
    },
    /// Job counts per queue and state.
    Stats,
    /// Delete finished jobs past retention, in batches.
    Purge {
        /// Delete completed and cancelled jobs finished longer ago than this (30s, 5m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = duration::parse)]
        older_than: Duration,
        /// Delete dead jobs finished longer ago than this.
        #[arg(long, default_value = "7d", value_parser = duration::parse)]
        dead_older_than: Duration,
    },
    /// Measure enqueue, processing and latency against raw INSERT baselines, in a scratch database.
    Bench(bench::BenchArgs),
    /// Serve the dashboard, /metrics, /healthz and /readyz; run maintenance (and webhook delivery).
    Serve(serve::ServeArgs),
}

#[derive(Subcommand, Debug)]
enum JobsCmd {
    /// List jobs, oldest first.
    List {
        /// Only jobs in this state: available, running, completed, dead or cancelled.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs on this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only jobs of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Show one job with all its fields and its error history.
    Show {
        /// The job id.
        id: i64,
    },
    /// Cancel an available or running job.
    Cancel {
        /// The job id.
        id: i64,
    },
    /// Put a dead or cancelled job back in its queue.
    Retry {
        /// The job id.
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
enum LedgerCmd {
    /// Show one record: its state, claimant, output and expiry.
    Show {
        /// The namespace: `step` for job steps with a business key, `idempotency` for
        /// with_idempotency (as printed in a parked job's error).
        namespace: String,
        /// The key within the namespace.
        key: String,
    },
    /// Settle a record whose outcome is unknown (a parked step), after checking with the
    /// external system; then retry the job. Refused while a live claim holds the record.
    Resolve {
        /// The namespace (see `ledger show`).
        namespace: String,
        /// The key within the namespace.
        key: String,
        /// The effect happened: record this JSON as the step's output.
        #[arg(
            long,
            value_name = "JSON",
            conflicts_with = "did_not_take_effect",
            required_unless_present = "did_not_take_effect"
        )]
        took_effect: Option<String>,
        /// The effect did not happen: forget the record, so the next attempt runs it.
        #[arg(long)]
        did_not_take_effect: bool,
    },
}

#[derive(Subcommand, Debug)]
enum WebhooksCmd {
    /// Create an endpoint (with a new secret, printed once).
    Add {
        /// Where to POST, e.g. http://billing.internal/hooks.
        url: String,
        /// Topics to receive (repeat, or `*` for all).
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// Deliver events that share an ordering key one at a time, in order.
        #[arg(long)]
        ordered: bool,
        /// Use this secret (`whsec_` + base64 of 24 to 64 bytes) instead of a new random one.
        #[arg(long)]
        secret: Option<String>,
        /// Accept a loopback or private address (only if the delivery worker allows them too).
        #[arg(long)]
        allow_private_network: bool,
    },
    /// Change an endpoint's URL and/or topics.
    Update {
        /// The endpoint id.
        endpoint: i64,
        /// The new URL.
        #[arg(long)]
        url: Option<String>,
        /// The new topics (repeat; replaces all of them).
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Accept a loopback or private address (only if the delivery worker allows them too).
        #[arg(long)]
        allow_private_network: bool,
    },
    /// Delete an endpoint and its delivery records; its pending deliveries are cancelled.
    Delete {
        /// The endpoint id.
        endpoint: i64,
    },
    /// Give an endpoint a new secret; the old one keeps signing too during the overlap.
    RotateSecret {
        /// The endpoint id.
        endpoint: i64,
        /// The new secret; a new random one when absent.
        #[arg(long)]
        secret: Option<String>,
        /// How long the previous secret keeps signing (30s, 5m, 24h, 7d; 0s ends it now).
        #[arg(long, default_value = "24h", value_parser = duration::parse)]
        overlap: Duration,
    },
    /// Rewrite every endpoint's stored secrets under the current key of ONCELY_SECRET_KEYS
    /// (`id:base64key[,old-id:base64key...]`): encrypts plain-text ones, re-encrypts ones under
    /// older keys. Run after installing a key ring or making a new key current.
    ReencryptSecrets,
    /// List endpoints with their state.
    Endpoints,
    /// List deliveries, newest event first.
    Deliveries {
        /// Only to this endpoint.
        #[arg(long)]
        endpoint: Option<i64>,
        /// Only those not delivered (pending, dead, cancelled).
        #[arg(long)]
        undelivered: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Deliver an event to an endpoint again, with the same webhook-id.
    Redeliver {
        /// The endpoint id.
        endpoint: i64,
        /// The event id.
        event: i64,
    },
    /// Deliver again every dead delivery that matches (to enabled endpoints), same webhook-ids.
    RedeliverDead {
        /// Only to this endpoint.
        #[arg(long)]
        endpoint: Option<i64>,
        /// Only events of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only events published since then (RFC 3339, or a duration ago such as 2h).
        #[arg(long, value_parser = webhooks::parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only events published before then (RFC 3339, or a duration ago such as 30m).
        #[arg(long, value_parser = webhooks::parse_time)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Enable a disabled endpoint.
    Enable {
        /// The endpoint id.
        endpoint: i64,
    },
    /// Disable an endpoint (publishes an oncely.endpoint.disabled event).
    Disable {
        /// The endpoint id.
        endpoint: i64,
        /// Why.
        #[arg(long, default_value = "disabled by an operator")]
        reason: String,
    },
}

/// A command failure: printed on stderr as one line, exit code 1.
#[derive(Debug)]
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oncely: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // `serve`'s configuration file is read first: it may name the database.
    let (cmd, serving) = match cli.cmd {
        Cmd::Serve(args) => match args.resolve() {
            Ok(settings) => (None, Some(settings)),
            Err(Fail(msg)) => {
                eprintln!("oncely: {msg}");
                return ExitCode::from(2);
            }
        },
        cmd => (Some(cmd), None),
    };
    let file_url = serving.as_ref().and_then(|s| s.database_url.clone());
    // Clap cannot make a global argument required, so check here, as a usage error.
    let Some(url) = cli.database_url.clone().or(file_url) else {
        eprintln!("oncely: the database is required: pass --database-url or set DATABASE_URL");
        return ExitCode::from(2);
    };
    let done = match (cmd, serving) {
        (_, Some(settings)) => runtime.block_on(serve::run(&url, settings)),
        (Some(cmd), None) => runtime.block_on(run(cmd, &url)),
        (None, None) => Err(Fail("no command".into())),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            eprintln!("oncely: {msg}");
            ExitCode::from(1)
        }
    }
}

/// Help and version go out as clap prints them; real usage errors become one line, exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
    }
    eprintln!("oncely: {}", one_line(&e.render().to_string()));
    ExitCode::from(2)
}

/// Clap's message without the usage and help hints, on one line.
fn one_line(msg: &str) -> String {
    msg.lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned()
}

async fn connect(url: &str) -> Result<sqlx::PgPool, Fail> {
    connect_with(url, 2).await
}

/// [`connect`] with a pool of up to `size` connections.
async fn connect_with(url: &str, size: u32) -> Result<sqlx::PgPool, Fail> {
    use sqlx::{ConnectOptions, Connection};
    let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(|e| Fail(format!("bad database URL: {e}")))?;
    let options = options.disable_statement_logging();
    // One direct attempt first: a pool would only report "timed out" where this names the cause.
    let probe = tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect_with(&options))
        .await
        .map_err(|_| Fail("cannot connect to the database: timed out after 10 s".into()))?
        .map_err(|e| Fail(format!("cannot connect to the database: {e}")))?;
    let _ = probe.close().await;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| Fail(format!("cannot connect to the database: {e}")))
}

async fn run(cmd: Cmd, url: &str) -> Result<(), Fail> {
    // Validate arguments before touching the database.
    if let Cmd::Jobs { cmd: JobsCmd::List { state: Some(s), .. } } = &cmd {
        s.parse::<JobState>()?;
    }
    let cmd = match cmd {
        Cmd::Bench(args) => return bench::run(url, args).await,
        Cmd::Serve(_) => return Err(Fail("serve: settings not resolved".into())),
        cmd => cmd,
    };
    // Endpoint secrets at rest are sealed and opened with this key ring, when one is given.
    if let Some(keys) = oncely_core::secrets::SecretKeys::from_env()? {
        oncely_core::secrets::install_secret_keys(keys);
    }
    let pool = connect(url).await?;
    let result = dispatch(&pool, cmd).await;
    pool.close().await;
    result
}

async fn dispatch(pool: &sqlx::PgPool, cmd: Cmd) -> Result<(), Fail> {
    match cmd {
        Cmd::Migrate => jobs::migrate(pool).await,
        Cmd::Jobs { cmd } => match cmd {
            JobsCmd::List { state, queue, kind, limit } => {
                let state = state.map(|s| s.parse::<JobState>()).transpose()?;
                jobs::list(pool, &JobFilter { state, queue, kind, after: None, limit: Some(limit) }).await
            }
            JobsCmd::Show { id } => jobs::show(pool, id).await,
            JobsCmd::Cancel { id } => jobs::cancel(pool, id).await,
            JobsCmd::Retry { id } => jobs::retry(pool, id).await,
        },
        Cmd::Ledger { cmd } => match cmd {
            LedgerCmd::Show { namespace, key } => {
                ledger::show(pool, &oncely_core::ledger::LedgerKey::new(namespace, key)).await
            }
            LedgerCmd::Resolve { namespace, key, took_effect, did_not_take_effect: _ } => {
                ledger::resolve(pool, &oncely_core::ledger::LedgerKey::new(namespace, key), took_effect).await
            }
        },
        Cmd::Webhooks { cmd } => match cmd {
            WebhooksCmd::Add { url, topics, ordered, secret, allow_private_network } => {
                webhooks::add(pool, url, topics, ordered, secret, allow_private_network).await
            }
            WebhooksCmd::Update { endpoint, url, topics, allow_private_network } => {
                webhooks::update(pool, endpoint, url, topics, allow_private_network).await
            }
            WebhooksCmd::Delete { endpoint } => webhooks::delete(pool, endpoint).await,
            WebhooksCmd::RotateSecret { endpoint, secret, overlap } => {
                webhooks::rotate_secret(pool, endpoint, secret, overlap).await
            }
            WebhooksCmd::RedeliverDead { endpoint, topic, since, until, limit } => {
                webhooks::redeliver_dead(pool, endpoint, topic, since, until, limit).await
            }
            WebhooksCmd::ReencryptSecrets => webhooks::reencrypt_secrets(pool).await,
            WebhooksCmd::Endpoints => webhooks::endpoints(pool).await,
            WebhooksCmd::Deliveries { endpoint, undelivered, limit } => {
                webhooks::deliveries(pool, endpoint, undelivered, limit).await
            }
            WebhooksCmd::Redeliver { endpoint, event } => webhooks::redeliver(pool, endpoint, event).await,
            WebhooksCmd::Enable { endpoint } => webhooks::enable(pool, endpoint).await,
            WebhooksCmd::Disable { endpoint, reason } => webhooks::disable(pool, endpoint, &reason).await,
        },
        Cmd::Runs { cmd } => runs::run(pool, cmd).await,
        Cmd::Queues { cmd } => queues::run(pool, cmd).await,
        Cmd::Bulk { cmd } => bulk::run(pool, cmd).await,
        Cmd::Stats => jobs::stats(pool).await,
        Cmd::Purge { older_than, dead_older_than } => jobs::purge(pool, older_than, dead_older_than).await,
        Cmd::Bench(_) | Cmd::Serve(_) => Err(Fail("bench and serve open their own pool".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_fit_on_one_line() {
        let e = Cli::try_parse_from(["oncely", "--database-url", "x", "purge", "--older-than", "7w"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(!line.contains('\n'));
        assert!(line.contains("unknown unit"), "{line}");
    }
}
