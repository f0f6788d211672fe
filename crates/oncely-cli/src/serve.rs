//! `oncely serve`: the dashboard, `/metrics`, `/healthz` and `/readyz` on one listener, with the
//! maintenance services and, optionally, webhook delivery — one process, stopped gracefully by
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;

use oncely_worker::Worker;

use crate::Fail;

/// `oncely serve`'s settings: each flag also reads an environment variable, and a TOML file
/// (`--config`) may give any of them under the flag's name. Precedence: flag, then environment
/// variable, then file, then the default.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct ServeArgs {
    /// A TOML file of settings, keyed by the flags' names (`listen = "0.0.0.0:8080"`,
    /// `read-only = true`, `database-url = "postgres://..."`). Flags and environment variables
    /// override it; an unknown key or a bad value is an error.
    #[arg(long, env = "ONCELY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed). [default: 127.0.0.1:8080]
    #[arg(long, env = "ONCELY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Require this token for the dashboard (Authorization: Bearer, or the login form). Without
    /// it anyone who reaches the listener can use the dashboard: bind to a private address.
    #[arg(long, env = "ONCELY_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Show the dashboard without any action.
    #[arg(long, env = "ONCELY_READ_ONLY", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    read_only: Option<bool>,
    /// Also deliver webhooks (serve the delivery queue).
    #[arg(long, env = "ONCELY_WEBHOOKS", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    webhooks: Option<bool>,
    /// Deliveries in flight at once, with --webhooks. [default: 32]
    #[arg(long, env = "ONCELY_WEBHOOK_CONCURRENCY")]
    webhook_concurrency: Option<usize>,
    /// Let webhook delivery reach loopback and private addresses.
    #[arg(long, env = "ONCELY_WEBHOOK_ALLOW_PRIVATE_NETWORKS", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    webhook_allow_private_networks: Option<bool>,
    /// Do not run the maintenance services (rescue, pruning, ledger cleanup): run them elsewhere.
    #[arg(long, env = "ONCELY_NO_MAINTENANCE", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    no_maintenance: Option<bool>,
    /// Apply pending migrations before serving.
    #[arg(long, env = "ONCELY_MIGRATE", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    migrate: Option<bool>,
    /// Database connections at most. [default: 8]
    #[arg(long, env = "ONCELY_POOL_SIZE")]
    pool_size: Option<u32>,
    /// Show stored idempotency responses on request (hidden otherwise: they may hold personal data).
    #[arg(long, env = "ONCELY_SHOW_IDEMPOTENCY_OUTPUT", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    show_idempotency_output: Option<bool>,
}

/// The configuration file: the flags' names as keys (kebab-case), every key optional, no other
/// key accepted.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServeFile {
    database_url: Option<String>,
    listen: Option<SocketAddr>,
    token: Option<String>,
    read_only: Option<bool>,
    webhooks: Option<bool>,
    webhook_concurrency: Option<usize>,
    webhook_allow_private_networks: Option<bool>,
    no_maintenance: Option<bool>,
    migrate: Option<bool>,
    pool_size: Option<u32>,
    show_idempotency_output: Option<bool>,
}

/// `oncely serve`'s settings, resolved: flag or environment variable, else file, else default.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    /// The database URL from the file, for when neither `--database-url` nor `DATABASE_URL` is given.
    pub(crate) database_url: Option<String>,
    listen: SocketAddr,
    token: Option<String>,
    read_only: bool,
    webhooks: bool,
    webhook_concurrency: usize,
    webhook_allow_private_networks: bool,
    no_maintenance: bool,
    migrate: bool,
    pool_size: u32,
    show_idempotency_output: bool,
}

impl ServeArgs {
    /// Read the `--config` file (if any) and resolve every setting. Errors name the file, and the
    /// key and line of a bad value or an unknown key.
    pub(crate) fn resolve(self) -> Result<Settings, Fail> {
        let file = match &self.config {
            None => ServeFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Fail(format!("cannot read the configuration file {}: {e}", path.display())))?;
                parse_file(&text).map_err(|e| Fail(format!("bad configuration file {}: {e}", path.display())))?
            }
        };
        self.resolve_with(file)
    }

    fn resolve_with(self, file: ServeFile) -> Result<Settings, Fail> {
        let settings = Settings {
            database_url: file.database_url,
            listen: self.listen.or(file.listen).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            token: self.token.or(file.token).filter(|t| !t.is_empty()),
            read_only: self.read_only.or(file.read_only).unwrap_or(false),
            webhooks: self.webhooks.or(file.webhooks).unwrap_or(false),
            webhook_concurrency: self.webhook_concurrency.or(file.webhook_concurrency).unwrap_or(32),
            webhook_allow_private_networks: self
                .webhook_allow_private_networks
                .or(file.webhook_allow_private_networks)
                .unwrap_or(false),
            no_maintenance: self.no_maintenance.or(file.no_maintenance).unwrap_or(false),
            migrate: self.migrate.or(file.migrate).unwrap_or(false),
            pool_size: self.pool_size.or(file.pool_size).unwrap_or(8),
            show_idempotency_output: self.show_idempotency_output.or(file.show_idempotency_output).unwrap_or(false),
        };
        if settings.pool_size < 2 {
            return Err(Fail("pool-size must be at least 2".into()));
        }
        if settings.webhooks && settings.webhook_concurrency == 0 {
            return Err(Fail("webhook-concurrency must be at least 1".into()));
        }
        Ok(settings)
    }
}

fn parse_file(text: &str) -> Result<ServeFile, String> {
    toml::from_str(text)
        .map_err(|e| e.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "))
}

/// Wait for SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub(crate) async fn run(url: &str, args: Settings) -> Result<(), Fail> {
    let pool = crate::connect_with(url, args.pool_size).await?;
    if args.migrate {
        oncely_core::migrate(&pool).await?;
    } else if !oncely_dashboard::telemetry::migrated(&pool).await? {
        tracing::warn!("the database is not migrated: /readyz answers 503 until `oncely migrate` runs");
    }
    let handle = oncely_dashboard::telemetry::install_prometheus()
        .map_err(|e| Fail(format!("cannot install the metrics recorder: {e}")))?;
    let mut dashboard = oncely_dashboard::Dashboard::new(pool.clone())
        .read_only(args.read_only)
        .metrics(handle)
        .show_idempotency_output(args.show_idempotency_output);
    if let Some(token) = args.token.clone().filter(|t| !t.is_empty()) {
        dashboard = dashboard.token(token);
    }
    let worker = build_worker(&pool, &args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Fail(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr().map_err(|e| Fail(format!("cannot read the listening address: {e}")))?;
    let worker = worker.map(Worker::start);
    println!("oncely serve: listening on http://{addr}/");
    tracing::info!(%addr, webhooks = args.webhooks, maintenance = !args.no_maintenance, "oncely serve started");
    let served = axum::serve(listener, dashboard.router()).with_graceful_shutdown(stop_signal()).await;
    tracing::info!("oncely serve stopping");
    if let Some(worker) = worker {
        worker.shutdown_within(Duration::from_secs(30)).await;
    }
    pool.close().await;
    served.map_err(|e| Fail(format!("the HTTP server failed: {e}")))
}

fn build_worker(pool: &sqlx::PgPool, args: &Settings) -> Result<Option<Worker>, Fail> {
    let maintenance = !args.no_maintenance;
    let builder = Worker::builder(pool.clone()).configure(|c| c.maintenance = maintenance);
    if args.webhooks {
        let transport = oncely_webhooks::HttpTransport::builder()
            .allow_private_networks(args.webhook_allow_private_networks)
            .build()?;
        let delivery =
            oncely_webhooks::WebhookDelivery::with_transport(oncely_webhooks::DeliveryConfig::default(), transport);
        let queue = oncely_core::outbox::DEFAULT_DELIVERY_QUEUE;
        return Ok(Some(builder.register(delivery).queue(queue, args.webhook_concurrency).build()?));
    }
    if !maintenance {
        return Ok(None);
    }
    Ok(Some(builder.build_maintenance_only()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn flags(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap().serve
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let file = parse_file(
            "database-url = \"postgres://file/db\"\nlisten = \"0.0.0.0:9000\"\ntoken = \"from-file\"\n\
             read-only = true\npool-size = 5\nwebhooks = true\nwebhook-concurrency = 4\n",
        )
        .unwrap();
        let s = flags(&["--token", "from-flag", "--read-only=false", "--pool-size", "3"]).resolve_with(file).unwrap();
        assert_eq!(s.database_url.as_deref(), Some("postgres://file/db"));
        assert_eq!(s.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(s.token.as_deref(), Some("from-flag"));
        assert!(!s.read_only, "--read-only=false beats read-only = true");
        assert_eq!((s.pool_size, s.webhooks, s.webhook_concurrency), (3, true, 4));
        let defaults = flags(&["--webhooks"]).resolve_with(ServeFile::default()).unwrap();
        assert_eq!(defaults.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((defaults.pool_size, defaults.webhook_concurrency, defaults.webhooks), (8, 32, true));
        assert!(!defaults.read_only && !defaults.migrate && defaults.token.is_none());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let unknown = parse_file("listen = \"127.0.0.1:1\"\nread_only = true\n").unwrap_err();
        assert!(unknown.contains("unknown field `read_only`") && unknown.contains("read-only"), "{unknown}");
        let bad = parse_file("listen = \"not an address\"\n").unwrap_err();
        assert!(bad.contains("listen") && bad.contains("line 1"), "{bad}");
        let wrong_type = parse_file("pool-size = \"many\"\n").unwrap_err();
        assert!(wrong_type.contains("pool-size"), "{wrong_type}");
        let small = flags(&[]).resolve_with(parse_file("pool-size = 1").unwrap()).unwrap_err();
        assert_eq!(small.0, "pool-size must be at least 2");
    }
}
