//! Webhook delivery: deliveries per second through a worker to a local receiver (over plain HTTP,
//! then over HTTPS), and the latency from an outbox commit to the request's arrival, next to plain
//! INSERT commits measured in the same run on the same server. Not a test.
//!
//! `scripts/with-postgres cargo bench --bench webhooks`
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use oncely::core::outbox::{publish, publish_many, Event, DEFAULT_DELIVERY_QUEUE};
use oncely::core::webhook::{create_endpoint, EndpointPolicy, NewEndpoint};
use oncely::worker::{WorkerHandle, WorkerStats};
use oncely::Worker;
use oncely_webhooks::{DeliveryConfig, HttpTransport, WebhookDelivery};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;

const BASELINE_TIME: Duration = Duration::from_secs(3);
const BASELINE_CONNECTIONS: usize = 16;
/// Events delivered by the throughput phase, published beforehand.
const EVENTS: u64 = 5_000;
/// Events per transaction when publishing them.
const PUBLISH_BATCH: u64 = 500;
/// Delivery slots of the worker, and the most jobs per claim.
const CONCURRENCY: usize = 64;
const FETCH_BATCH: usize = 64;
/// The worker's pool: claims, completions, heartbeats, and two statements per delivery.
const WORKER_CONNECTIONS: u32 = 16;
const LATENCY_SAMPLES: usize = 300;

/// Answers 200 at once. `/fast` counts; `/timed` also reports when each `webhook-id` arrived.
struct Receiver {
    hits: AtomicU64,
    arrivals: mpsc::UnboundedSender<(String, Instant)>,
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    Path(route): Path<String>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let arrived = Instant::now();
    r.hits.fetch_add(1, Ordering::Relaxed);
    if route == "timed" {
        let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let _ = r.arrivals.send((id.to_owned(), arrived));
    }
    StatusCode::OK
}

/// Serve `app` over HTTPS (HTTP/1.1 with keep-alive, like the plain receiver) on 127.0.0.1 with a
/// certificate for `localhost` issued by a CA made here; returns the port and the CA's PEM.
async fn tls_receiver(app: axum::Router) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio_rustls::rustls;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "oncely bench CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, ca.pem())
}

/// Single-row INSERT commits per second from `connections` connections at once.
async fn insert_baseline(url: &str, connections: usize) -> f64 {
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(PgConnection::connect(url).await.unwrap());
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < BASELINE_TIME {
                    sqlx::query("INSERT INTO bench_baseline (payload) VALUES ('{}')").execute(&mut conn).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut rows = 0;
    for t in tasks {
        rows += t.await.unwrap();
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

/// Wait (polling every millisecond) until the worker has recorded `n` completions.
async fn wait_completed(handle: &WorkerHandle, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while WorkerStats::get(&handle.stats().completed) < n {
        assert!(Instant::now() < deadline, "the worker did not complete {n} jobs in time");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("oncely_webhooks_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&server).await.expect("DATABASE_URL must reach PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.unwrap();
    let url = oncely_testkit::url_with_database(&server, &name);
    let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
    oncely::migrate(&pool).await.unwrap();
    println!(
        "webhooks bench: database {name}; {EVENTS} events, {CONCURRENCY} slots, fetch batch {FETCH_BATCH}, \
         {WORKER_CONNECTIONS} worker connections, {LATENCY_SAMPLES} latency samples"
    );

    // (a) Baselines.
    sqlx::query("CREATE TABLE bench_baseline (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let base_one = insert_baseline(&url, 1).await;
    println!("[1/6] baseline, 1 connection: {base_one:.0} INSERT commits/s");
    let base_many = insert_baseline(&url, BASELINE_CONNECTIONS).await;
    println!("[2/6] baseline, {BASELINE_CONNECTIONS} connections: {base_many:.0} INSERT commits/s");

    // The receiver, and one endpoint per phase (distinct topics).
    let (tx, mut arrivals) = mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver { hits: AtomicU64::new(0), arrivals: tx });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/{route}", post(receive)).with_state(receiver.clone());
    tokio::spawn({
        let app = app.clone();
        async move { axum::serve(listener, app).await }
    });
    let (tls_port, ca_pem) = tls_receiver(app).await;
    // One transport for both phases: it trusts the bench's CA besides the web roots.
    let transport = || {
        HttpTransport::builder()
            .allow_private_networks(true)
            .add_root_certificate_pem(ca_pem.as_bytes())
            .unwrap()
            .build()
            .unwrap()
    };
    let local = EndpointPolicy::default().allow_private_networks(true);
    let endpoint = |url: String, topic: &str| NewEndpoint::new(url, [topic]).policy(local.clone());
    create_endpoint(&pool, &endpoint(format!("http://{addr}/fast"), "bench.throughput")).await.unwrap();
    create_endpoint(&pool, &endpoint(format!("http://{addr}/timed"), "bench.latency")).await.unwrap();
    create_endpoint(&pool, &endpoint(format!("https://localhost:{tls_port}/fast"), "bench.tls")).await.unwrap();

    // (b) Publish EVENTS with no worker running — the first half one `publish` call per event, the
    // second half one `publish_many` call per batch, PUBLISH_BATCH per transaction — then deliver
    // them all.
    let half = EVENTS / 2;
    let event = |i: u64| Event::from_json("bench.throughput", serde_json::json!({ "n": i }));
    let start = Instant::now();
    for first in (0..half).step_by(PUBLISH_BATCH as usize) {
        let mut tx = pool.begin().await.unwrap();
        for i in first..(first + PUBLISH_BATCH).min(half) {
            publish(&mut *tx, &event(i)).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let elapsed = start.elapsed();
    let publish_rate = half as f64 / elapsed.as_secs_f64();
    println!("[3/6] publish, {PUBLISH_BATCH} per transaction: {half} events in {elapsed:.2?} = {publish_rate:.0}/s");
    let batches: Vec<Vec<Event>> = (half..EVENTS)
        .step_by(PUBLISH_BATCH as usize)
        .map(|first| (first..(first + PUBLISH_BATCH).min(EVENTS)).map(event).collect())
        .collect();
    let start = Instant::now();
    for batch in &batches {
        publish_many(&pool, batch).await.unwrap();
    }
    let elapsed = start.elapsed();
    let publish_many_rate = (EVENTS - half) as f64 / elapsed.as_secs_f64();
    println!(
        "[3/6] publish_many, {PUBLISH_BATCH} per call: {} events in {elapsed:.2?} = {publish_many_rate:.0}/s",
        EVENTS - half
    );

    let worker_pool = PgPoolOptions::new().max_connections(WORKER_CONNECTIONS).connect(&url).await.unwrap();
    let mut warm = Vec::new();
    for _ in 0..WORKER_CONNECTIONS {
        warm.push(worker_pool.acquire().await.unwrap());
    }
    drop(warm);
    let worker = || {
        Worker::builder(worker_pool.clone())
            .register(WebhookDelivery::with_transport(DeliveryConfig::default(), transport()))
            .queue(DEFAULT_DELIVERY_QUEUE, CONCURRENCY)
            .configure(|c| c.fetch_batch = FETCH_BATCH)
            .build()
            .unwrap()
    };
    let start = Instant::now();
    let handle = worker().start();
    wait_completed(&handle, EVENTS).await;
    let elapsed = start.elapsed();
    let deliver_rate = EVENTS as f64 / elapsed.as_secs_f64();
    let (delivered, attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE delivered_at IS NOT NULL), coalesce(sum(attempts), 0)::bigint \
         FROM oncely.webhook_deliveries",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(delivered, EVENTS as i64, "every delivery is recorded as delivered");
    println!(
        "[4/6] deliveries: {EVENTS} in {elapsed:.2?} = {deliver_rate:.0}/s (checked in SQL: {delivered} delivered, \
         {attempts} attempts; receiver saw {} requests)",
        receiver.hits.load(Ordering::Relaxed)
    );

    // (c) One event at a time to an idle worker: commit -> arrival at the receiver.
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let mut tx = pool.begin().await.unwrap();
        let event = Event::from_json("bench.latency", serde_json::json!({ "n": i }));
        let published = publish(&mut *tx, &event).await.unwrap();
        let before_commit = Instant::now();
        tx.commit().await.unwrap();
        let arrived = loop {
            let (id, at) = tokio::time::timeout(Duration::from_secs(10), arrivals.recv()).await.unwrap().unwrap();
            if id == published.message_id {
                break at;
            }
        };
        samples.push(arrived - before_commit);
        // Let the worker record the completion, so the next sample finds it idle.
        wait_completed(&handle, EVENTS + i as u64 + 1).await;
    }
    samples.sort();
    let (p50, p99, max) = (percentile(&samples, 0.5), percentile(&samples, 0.99), percentile(&samples, 1.0));
    println!(
        "[5/6] commit -> arrival, idle worker, {LATENCY_SAMPLES} samples: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );

    handle.shutdown().await;

    // (d) The throughput phase again over HTTPS: the same events, worker and receiver, published
    // the same way with no worker running; a fresh worker, so its connections are made (and
    // their TLS handshakes paid) inside the timed part, as in phase 4.
    let batches: Vec<Vec<Event>> = (0..EVENTS)
        .step_by(PUBLISH_BATCH as usize)
        .map(|first| {
            (first..(first + PUBLISH_BATCH).min(EVENTS))
                .map(|i| Event::from_json("bench.tls", serde_json::json!({ "n": i })))
                .collect()
        })
        .collect();
    for batch in &batches {
        publish_many(&pool, batch).await.unwrap();
    }
    let hits_before = receiver.hits.load(Ordering::Relaxed);
    let start = Instant::now();
    let handle = worker().start();
    wait_completed(&handle, EVENTS).await;
    let elapsed = start.elapsed();
    let tls_rate = EVENTS as f64 / elapsed.as_secs_f64();
    handle.shutdown().await;
    let tls_delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM oncely.webhook_deliveries d JOIN oncely.events e ON e.id = d.event_id \
         WHERE e.topic = 'bench.tls' AND d.delivered_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tls_delivered, EVENTS as i64, "every HTTPS delivery is recorded as delivered");
    println!(
        "[6/6] deliveries over HTTPS: {EVENTS} in {elapsed:.2?} = {tls_rate:.0}/s (checked in SQL: {tls_delivered} \
         delivered; receiver saw {} requests) = {:.2}x plain HTTP",
        receiver.hits.load(Ordering::Relaxed) - hits_before,
        tls_rate / deliver_rate
    );
    worker_pool.close().await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).execute(&mut admin).await.unwrap();

    let rows = [
        ("INSERT commits/s, 1 connection".to_owned(), format!("{base_one:.0}"), String::new()),
        (format!("INSERT commits/s, {BASELINE_CONNECTIONS} connections"), format!("{base_many:.0}"), String::new()),
        (format!("publish events/s, {PUBLISH_BATCH} per transaction"), format!("{publish_rate:.0}"), String::new()),
        (format!("publish_many events/s, {PUBLISH_BATCH} per call"), format!("{publish_many_rate:.0}"), String::new()),
        (
            "deliveries/s".to_owned(),
            format!("{deliver_rate:.0}"),
            format!("{:.2}x {BASELINE_CONNECTIONS}-conn baseline", deliver_rate / base_many),
        ),
        (
            "deliveries/s over HTTPS".to_owned(),
            format!("{tls_rate:.0}"),
            format!("{:.2}x plain HTTP deliveries", tls_rate / deliver_rate),
        ),
        ("commit -> arrival p50, ms".to_owned(), format!("{:.2}", ms(p50)), String::new()),
        ("commit -> arrival p99, ms".to_owned(), format!("{:.2}", ms(p99)), String::new()),
        ("commit -> arrival max, ms".to_owned(), format!("{:.2}", ms(max)), String::new()),
    ];
    println!("\nsummary");
    for (figure, value, ratio) in rows {
        println!("{}", format!("  {figure:<42} {value:>9}  {ratio}").trim_end());
    }
}
