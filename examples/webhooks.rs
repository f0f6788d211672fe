//! Webhook delivery end to end: publish events through the outbox, deliver them with a worker to a
//! local receiver that fails at random, and check that every committed event took effect exactly
//! once per endpoint and no rolled-back event was ever sent. Exits 1 when a check fails, 2 on an error.
//!
//! ```text
//! scripts/with-postgres cargo run --example webhooks -- [--events 200] [--failure-rate 0.3]
//!     [--endpoints 2] [--deadline-secs 120] [--keep-db]
//! ```
//!
//! The receiver (axum, 127.0.0.1 only) verifies each signature (401 if bad), then fails a
//! `--failure-rate` share of requests: 500, or 503 with `Retry-After: 0`, or (one failure in twenty)
//! it applies the event and answers after the sender's timeout, so the sender retries a message that
//! already took effect. It deduplicates on `webhook-id`. Events are published five per transaction
//! beside a business row; every other transaction rolls back. Odd-numbered endpoints are `ordered`:
//! there, events sharing an ordering key must take effect in commit order.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use clap::Parser;
use oncely::core::outbox::{publish, Event, Published, DEFAULT_DELIVERY_QUEUE};
use oncely::core::webhook::{
    create_endpoint, list_deliveries, Delivery, DeliveryFilter, DeliveryState, NewEndpoint, WebhookSecret,
};
use oncely::webhooks::signature::{verify_headers, DEFAULT_TOLERANCE};
use oncely::webhooks::{DeliveryConfig, HttpTransport, RetrySchedule, WebhookDelivery};
use oncely::Worker;
use sqlx::Connection;

#[derive(Parser, Debug)]
struct Args {
    /// Events to publish; half of them in transactions that roll back.
    #[arg(long, default_value_t = 200)]
    events: usize,
    /// Share of requests the receiver fails, in [0, 1).
    #[arg(long, default_value_t = 0.3)]
    failure_rate: f64,
    /// Webhook endpoints (each receives every event).
    #[arg(long, default_value_t = 2)]
    endpoints: usize,
    /// Give up waiting for the deliveries after this many seconds.
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
    /// Keep the database afterwards.
    #[arg(long)]
    keep_db: bool,
}

/// The sender's time limit per attempt; the receiver's slow answers take longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const EVENTS_PER_TX: usize = 5;
/// Enough that a 0.3 failure rate never exhausts them (0.3^25).
const MAX_ATTEMPTS: i32 = 25;

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    requests: u64,
    bad_signatures: u64,
    duplicates: u64,
    /// Every verified `webhook-id`, whatever the answer.
    ids: HashSet<String>,
    /// Per endpoint: the ids applied (first seen, answered 200). The effects.
    effects: Vec<HashSet<String>>,
    /// Per endpoint and ordering key: the events' sequence numbers in the order they took effect.
    order: Vec<HashMap<String, Vec<u64>>>,
}

struct Receiver {
    secrets: Vec<WebhookSecret>,
    failure_rate: f64,
    seen: Mutex<Seen>,
}

async fn receive(State(r): State<Arc<Receiver>>, Path(n): Path<usize>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = r.secrets.get(n) else { return StatusCode::NOT_FOUND.into_response() };
    let Ok(verified) = verify_headers(secret, &headers, &body, DEFAULT_TOLERANCE) else {
        r.seen.lock().expect("receiver lock").bad_signatures += 1;
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let id = verified.message_id;
    let roll: f64 = rand::random();
    let (fail, slow) = (roll < r.failure_rate, roll < r.failure_rate / 20.0);
    {
        let mut seen = r.seen.lock().expect("receiver lock");
        seen.requests += 1;
        seen.ids.insert(id.clone());
        if fail && !slow {
            return if roll < r.failure_rate / 2.0 {
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")]).into_response()
            };
        }
        if seen.effects[n].insert(id) {
            let data = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()["data"].take();
            if let (Some(key), Some(seq)) = (data["key"].as_str(), data["seq"].as_u64()) {
                seen.order[n].entry(key.to_owned()).or_default().push(seq);
            }
        } else {
            seen.duplicates += 1;
        }
    }
    if slow {
        // Applied, but the answer comes after the sender gave up: it will send again.
        tokio::time::sleep(REQUEST_TIMEOUT + Duration::from_millis(300)).await;
    }
    StatusCode::OK.into_response()
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into())).init();
    let args = Args::parse();
    if args.endpoints == 0 || !(0.0..1.0).contains(&args.failure_rate) {
        eprintln!("webhooks: need --endpoints >= 1 and --failure-rate in [0, 1)");
        return ExitCode::from(2);
    }
    let server = oncely::testkit::server_url();
    let name = format!("oncely_webhooks_example_{}", std::process::id());
    let result = async {
        let mut admin = sqlx::PgConnection::connect(&server).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&oncely::testkit::url_with_database(&server, &name))
            .await?;
        // Endpoint secrets are encrypted at rest when a key ring is given (docs/webhooks.md).
        if let Some(keys) = oncely::secrets::SecretKeys::from_env()? {
            oncely::secrets::install_secret_keys(keys);
        }
        let result = run(&args, &pool).await;
        pool.close().await;
        if args.keep_db {
            println!("kept database {name}");
        } else {
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await?;
        }
        result
    }
    .await;
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("webhooks: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args, pool: &sqlx::PgPool) -> BoxResult<bool> {
    oncely::migrate(pool).await?;
    sqlx::query("CREATE TABLE orders (id bigserial PRIMARY KEY)").execute(pool).await?;

    // The receiver, then one endpoint per path on it.
    let secrets: Vec<WebhookSecret> = (0..args.endpoints).map(|_| WebhookSecret::generate()).collect();
    let receiver = Arc::new(Receiver {
        secrets: secrets.clone(),
        failure_rate: args.failure_rate,
        seen: Mutex::new(Seen {
            effects: vec![HashSet::new(); args.endpoints],
            order: vec![HashMap::new(); args.endpoints],
            ..Seen::default()
        }),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/hooks/{n}", post(receive)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    for (i, secret) in secrets.into_iter().enumerate() {
        let topics = if i == 0 { vec!["*"] } else { vec!["order.created", "order.paid"] };
        // The receiver listens on loopback, which endpoints refuse by default (as HttpTransport does).
        let local = oncely::core::webhook::EndpointPolicy::default().allow_private_networks(true);
        let new = NewEndpoint::new(format!("http://{addr}/hooks/{i}"), topics)
            .ordered(i % 2 == 1)
            .secret(secret)
            .policy(local);
        let ep = create_endpoint(pool, &new).await?;
        println!("endpoint {}: {} ordered={} topics={:?}", ep.id, ep.url, ep.ordered, ep.topics);
    }

    // The worker runs while events are published (and rolled back).
    let config = DeliveryConfig {
        request_timeout: REQUEST_TIMEOUT,
        schedule: RetrySchedule { delays: [50, 100, 200].map(Duration::from_millis).to_vec(), jitter: 0.5 },
        ordered_wait: Duration::from_millis(200),
        ..DeliveryConfig::default()
    };
    let worker = Worker::builder(pool.clone())
        // The receiver listens on loopback, which HttpTransport refuses unless allowed.
        .register(WebhookDelivery::with_transport(config, HttpTransport::new().allow_private_networks()))
        .queue(DEFAULT_DELIVERY_QUEUE, 32)
        .configure(|c| {
            c.maintenance_interval = Duration::from_millis(500);
            c.shutdown_timeout = Duration::from_secs(5);
        })
        .build()?
        .start();

    let started = Instant::now();
    let (mut committed, mut rolled_back) = (Vec::<Published>::new(), Vec::<Published>::new());
    for (t, chunk) in (0..args.events).collect::<Vec<_>>().chunks(EVENTS_PER_TX).enumerate() {
        let mut tx = pool.begin().await?;
        let mut batch = Vec::new();
        for &seq in chunk {
            let order: i64 =
                sqlx::query_scalar("INSERT INTO orders DEFAULT VALUES RETURNING id").fetch_one(&mut *tx).await?;
            let topic = if seq % 2 == 0 { "order.created" } else { "order.paid" };
            let key = (seq % 3 != 0).then(|| format!("customer:{}", seq % 4));
            let payload = serde_json::json!({ "order_id": order, "seq": seq, "key": key });
            let event = Event::new(topic, &payload)?.max_attempts(MAX_ATTEMPTS);
            let event = match key {
                Some(key) => event.ordering_key(key),
                None => event,
            };
            batch.push(publish(&mut *tx, &event).await?);
        }
        if t % 2 == 0 {
            tx.commit().await?;
            committed.extend(batch);
        } else {
            tx.rollback().await?;
            rolled_back.extend(batch);
        }
    }
    let (n_ok, n_back) = (committed.len(), rolled_back.len());
    println!("published {} events ({n_ok} committed, {n_back} rolled back) in {:.2?}", args.events, started.elapsed());

    // Wait until every delivery is delivered, or one is stuck for good, or the deadline passes.
    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let filter = DeliveryFilter { undelivered: true, limit: Some(1000), ..DeliveryFilter::default() };
    let waited = loop {
        tick.tick().await;
        let pending = list_deliveries(pool, &filter).await?;
        if pending.is_empty() {
            break Ok(started.elapsed());
        }
        if let Some(d) = pending.iter().find(|d| d.state != DeliveryState::Pending) {
            let (event, endpoint, state) = (d.event_id, d.endpoint_id, d.state);
            break Err(format!("event {event} to endpoint {endpoint} is {state:?}: {:?}", d.last_error));
        }
        if Instant::now() > deadline {
            break Err(format!("{} deliveries still pending after {}s", pending.len(), args.deadline_secs));
        }
    };
    worker.shutdown().await;
    match &waited {
        Ok(t) => println!("all delivered {t:.2?} after publishing began"),
        Err(e) => println!("NOT DONE: {e}"),
    }

    let want = n_ok * args.endpoints;
    let all = DeliveryFilter { limit: Some(want as i64 + 1000), ..DeliveryFilter::default() };
    let deliveries = list_deliveries(pool, &all).await?;
    print_table(&deliveries);

    let seen = receiver.seen.lock().expect("receiver lock");
    let delivered = deliveries.iter().filter(|d| d.state == DeliveryState::Delivered).count();
    let attempts: i64 = deliveries.iter().map(|d| i64::from(d.attempts)).sum();
    let committed_ids: HashSet<&str> = committed.iter().map(|p| p.message_id.as_str()).collect();
    let effects: usize = seen.effects.iter().map(HashSet::len).sum();
    let exact = seen.effects.iter().all(|e| e.iter().all(|id| committed_ids.contains(id.as_str())));
    let ghosts = rolled_back.iter().filter(|p| seen.ids.contains(&p.message_id)).count();
    let out_of_order = (1..args.endpoints)
        .step_by(2)
        .flat_map(|n| seen.order[n].values())
        .filter(|seqs| seqs.windows(2).any(|w| w[0] > w[1]))
        .count();
    let checks = [
        ("all delivered", waited.is_ok() && delivered == want && deliveries.len() == want),
        ("no bad signatures", seen.bad_signatures == 0),
        ("one effect per committed event and endpoint", exact && effects == want),
        ("no rolled-back event seen", ghosts == 0),
        ("ordered endpoints in order", out_of_order == 0),
    ];
    println!("\nevents committed:                 {n_ok}");
    println!("events rolled back:               {n_back}");
    println!("deliveries:                       {delivered} delivered of {} (expected {want})", deliveries.len());
    println!("attempts made:                    {attempts} (receiver saw {} signed requests)", seen.requests);
    println!("bad signatures seen:              {}", seen.bad_signatures);
    println!("receiver effects (deduplicated):  {effects} (expected {n_ok} x {} = {want})", args.endpoints);
    println!("duplicates ignored by receiver:   {}", seen.duplicates);
    println!("rolled-back events seen:          {ghosts}");
    println!("ordering keys out of order:       {out_of_order}");
    for (what, ok) in checks {
        println!("{:<5} {what}", if ok { "OK" } else { "FAIL" });
    }
    Ok(checks.iter().all(|(_, ok)| *ok))
}

/// Attempts per endpoint of the first ten events (`state` shown when not delivered).
fn print_table(deliveries: &[Delivery]) {
    let endpoints: Vec<_> = deliveries.iter().map(|d| d.endpoint_id).collect::<BTreeSet<_>>().into_iter().collect();
    let mut rows: BTreeMap<_, (&str, Vec<String>)> = BTreeMap::new();
    for d in deliveries {
        let row = rows.entry(d.event_id).or_insert_with(|| (&d.message_id, vec!["-".into(); endpoints.len()]));
        row.1[endpoints.binary_search(&d.endpoint_id).unwrap_or(0)] = match d.state {
            DeliveryState::Delivered => d.attempts.to_string(),
            state => format!("{}({state:?})", d.attempts),
        };
    }
    let cells = |c: &mut dyn Iterator<Item = String>| c.map(|c| format!("{c:>7}")).collect::<String>();
    println!("\nattempts per endpoint (first 10 of {} events)", rows.len());
    println!("{:>6}  {:<36}{}", "event", "webhook-id", cells(&mut endpoints.iter().map(|e| format!("ep {e}"))));
    for (event, (msg, row)) in rows.iter().take(10) {
        println!("{event:>6}  {msg:<36}{}", cells(&mut row.iter().cloned()));
    }
    if rows.len() > 10 {
        println!("   ... {} more", rows.len() - 10);
    }
}
