//! `oncely serve`: the dashboard, `/metrics`, `/healthz` and `/readyz` on one listener, with the
//! maintenance services and, optionally, webhook delivery — one process, stopped gracefully by
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::time::Duration;

use oncely_worker::Worker;

use crate::Fail;

/// `oncely serve`'s settings: each flag also reads an environment variable.
#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, env = "ONCELY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Require this token for the dashboard (Authorization: Bearer, or the login form). Without
    /// it anyone who reaches the listener can use the dashboard: bind to a private address.
    #[arg(long, env = "ONCELY_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Show the dashboard without any action.
    #[arg(long, env = "ONCELY_READ_ONLY")]
    read_only: bool,
    /// Also deliver webhooks (serve the delivery queue).
    #[arg(long, env = "ONCELY_WEBHOOKS")]
    webhooks: bool,
    /// Deliveries in flight at once, with --webhooks.
    #[arg(long, env = "ONCELY_WEBHOOK_CONCURRENCY", default_value_t = 32)]
    webhook_concurrency: usize,
    /// Let webhook delivery reach loopback and private addresses.
    #[arg(long, env = "ONCELY_WEBHOOK_ALLOW_PRIVATE_NETWORKS")]
    webhook_allow_private_networks: bool,
    /// Do not run the maintenance services (rescue, pruning, ledger cleanup): run them elsewhere.
    #[arg(long, env = "ONCELY_NO_MAINTENANCE")]
    no_maintenance: bool,
    /// Apply pending migrations before serving.
    #[arg(long, env = "ONCELY_MIGRATE")]
    migrate: bool,
    /// Database connections at most.
    #[arg(long, env = "ONCELY_POOL_SIZE", default_value_t = 8)]
    pool_size: u32,
    /// Show stored idempotency responses on request (hidden otherwise: they may hold personal data).
    #[arg(long, env = "ONCELY_SHOW_IDEMPOTENCY_OUTPUT")]
    show_idempotency_output: bool,
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

pub(crate) async fn run(url: &str, args: ServeArgs) -> Result<(), Fail> {
    if args.pool_size < 2 {
        return Err(Fail("--pool-size must be at least 2".into()));
    }
    if args.webhooks && args.webhook_concurrency == 0 {
        return Err(Fail("--webhook-concurrency must be at least 1".into()));
    }
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

fn build_worker(pool: &sqlx::PgPool, args: &ServeArgs) -> Result<Option<Worker>, Fail> {
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
