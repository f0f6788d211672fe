//! Outbox and webhook delivery against a local receiver: transactional publish, random failures,
//! signatures checked by an independent HMAC implementation, fresh timestamps, stable webhook ids,
//! 410, Retry-After, disabling, ordered delivery, two workers, rotation, and a delivery worker killed
//! with SIGKILL mid-request.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::common::receiver::{Hit, Receiver, Reply};
use crate::common::*;
use base64::Engine as _;
use oncely::core::outbox::{self, publish, Event, DEFAULT_DELIVERY_QUEUE, ENDPOINT_DISABLED_TOPIC};
use oncely::core::webhook::{
    self, create_endpoint, get_endpoint, list_deliveries, redeliver, rotate_secret, DeliveryFilter, DeliveryState,
    EndpointPolicy, NewEndpoint, WebhookSecret,
};
use oncely::JobState;
use oncely_webhooks::{DeliveryConfig, HttpTransport, RetrySchedule, WebhookDelivery};
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// HMAC-SHA256 written from RFC 2104, independent of the `hmac` crate the sender uses.
fn rfc2104_hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// Check a hit's signature header the way the Standard Webhooks spec describes it: the key is the
/// base64 after `whsec_`, the content `id.timestamp.body`, one of the space-separated `v1,`
/// entries must match.
fn spec_verifies(secret: &str, hit: &Hit) -> bool {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut content = format!("{}.{}.", hit.id, hit.timestamp).into_bytes();
    content.extend_from_slice(&hit.body);
    let expected = format!("v1,{}", engine.encode(rfc2104_hmac_sha256(&key, &content)));
    hit.signature.split(' ').any(|s| s == expected)
}

#[test]
fn the_independent_hmac_matches_rfc_4231_case_2() {
    let mac = rfc2104_hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

fn fast_delivery() -> DeliveryConfig {
    DeliveryConfig {
        request_timeout: Duration::from_secs(1),
        schedule: RetrySchedule { delays: vec![Duration::from_millis(20), Duration::from_millis(50)], jitter: 0.2 },
        ordered_wait: Duration::from_millis(100),
        ..DeliveryConfig::default()
    }
}

/// An endpoint for the tests' receivers, which listen on loopback addresses (refused when created
/// under the default policy).
fn local_endpoint<T: Into<String>>(url: impl Into<String>, topics: impl IntoIterator<Item = T>) -> NewEndpoint {
    NewEndpoint::new(url, topics).policy(EndpointPolicy::default().allow_private_networks(true))
}

/// The delivery handler for the tests' receivers, which listen on loopback addresses.
fn local_delivery(config: DeliveryConfig) -> WebhookDelivery {
    WebhookDelivery::with_transport(config, HttpTransport::new().allow_private_networks())
}

fn delivery_worker(pool: PgPool, config: DeliveryConfig) -> oncely::WorkerHandle {
    builder(pool).register(local_delivery(config)).queue(DEFAULT_DELIVERY_QUEUE, 16).build().unwrap().start()
}

async fn wait_delivered(pool: &PgPool, n: usize) {
    eventually(Duration::from_secs(60), "every delivery delivered", || async {
        let all = list_deliveries(pool, &DeliveryFilter { limit: Some(100_000), ..Default::default() }).await.ok()?;
        (all.len() == n && all.iter().all(|d| d.state == DeliveryState::Delivered)).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_exists_if_and_only_if_its_transaction_commits() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["order.created"])).await.unwrap();
    // An endpoint for another topic gets nothing.
    create_endpoint(pool, &local_endpoint(rx.url("other"), ["invoice.paid"])).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let rolled_back =
        publish(&mut *tx, &Event::new("order.created", &serde_json::json!({"n": 1})).unwrap()).await.unwrap();
    assert_eq!(rolled_back.deliveries, 1);
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let committed =
        publish(&mut *tx, &Event::new("order.created", &serde_json::json!({"n": 2})).unwrap()).await.unwrap();
    tx.commit().await.unwrap();

    let h = delivery_worker(db.new_pool(4).await, fast_delivery());
    wait_delivered(pool, 1).await;
    h.shutdown().await;

    let hits = rx.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!((hits[0].endpoint.as_str(), hits[0].id.as_str()), ("a", committed.message_id.as_str()));
    let body: serde_json::Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["data"], serde_json::json!({"n": 2}));
    assert!(hits.iter().all(|h| h.id != rolled_back.message_id));
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.events").fetch_one(pool).await.unwrap();
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_receiver_failing_at_random_every_event_arrives_signed_with_a_stable_id_and_fresh_timestamps() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| {
        let mut rng = rand::rng();
        match rng.random_range(0..10) {
            0..=2 => Reply::Status(500),
            3 => Reply::Status(404),
            _ => Reply::Status(204),
        }
    })
    .await;
    let a = create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let b = create_endpoint(pool, &local_endpoint(rx.url("b"), ["report.ready"])).await.unwrap();
    let secrets = HashMap::from([("a", a.secret.as_str().to_owned()), ("b", b.secret.as_str().to_owned())]);

    const EVENTS: usize = 150;
    let mut ids = Vec::new();
    for i in 0..EVENTS {
        let e = Event::new("report.ready", &serde_json::json!({"report": i})).unwrap().max_attempts(40);
        ids.push(publish(pool, &e).await.unwrap().message_id);
    }
    let h = delivery_worker(db.new_pool(8).await, fast_delivery());
    wait_delivered(pool, EVENTS * 2).await;
    h.shutdown().await;

    let hits = rx.hits();
    // Every event reached both endpoints, and the receiver's deduplicated effects are exactly those.
    let mut effects = rx.effects();
    effects.sort();
    let mut expected: Vec<(String, String)> =
        ids.iter().flat_map(|id| [("a".to_owned(), id.clone()), ("b".to_owned(), id.clone())]).collect();
    expected.sort();
    assert_eq!(effects, expected);
    assert!(hits.len() > EVENTS * 2, "random failures must have caused retries ({} hits)", hits.len());

    let mut per_delivery: BTreeMap<(String, String), Vec<&Hit>> = BTreeMap::new();
    for hit in &hits {
        assert!(spec_verifies(&secrets[hit.endpoint.as_str()], hit), "signature of {hit:?}");
        let ts: i64 = hit.timestamp.parse().unwrap();
        assert!((hit.arrived_unix - ts).abs() <= 2, "timestamp {ts} is not fresh at arrival {}", hit.arrived_unix);
        per_delivery.entry((hit.endpoint.clone(), hit.id.clone())).or_default().push(hit);
    }
    let mut retried = 0;
    for ((endpoint, id), attempts) in &per_delivery {
        assert!(ids.contains(id), "unknown webhook-id {id}");
        // The body is byte-identical on every attempt; only a 2xx ends the attempts.
        assert!(attempts.iter().all(|h| h.body == attempts[0].body));
        let successes = attempts.iter().filter(|h| (200..300).contains(&h.status)).count();
        assert_eq!(successes, 1, "{endpoint}/{id}: {attempts:?}");
        assert!((200..300).contains(&attempts.last().unwrap().status));
        if attempts.len() > 1 {
            retried += 1;
        }
    }
    assert!(retried > 0);

    // The record matches what the receiver saw.
    let deliveries =
        list_deliveries(pool, &DeliveryFilter { limit: Some(10_000), ..Default::default() }).await.unwrap();
    for d in &deliveries {
        let endpoint = if d.endpoint_id == a.id { "a" } else { "b" };
        assert_eq!(d.attempts as usize, per_delivery[&(endpoint.to_owned(), d.message_id.clone())].len());
        assert_eq!(d.last_status, Some(204));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_delivery_workers_never_attempt_one_delivery_concurrently() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|hit| {
        if rand::rng().random_bool(0.3) {
            Reply::Status(503)
        } else if hit.nth == 1 {
            Reply::SlowOk(Duration::from_millis(5))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    const EVENTS: usize = 200;
    for i in 0..EVENTS {
        publish(pool, &Event::new("t", &i).unwrap().max_attempts(40)).await.unwrap();
    }
    let w1 = delivery_worker(db.new_pool(6).await, fast_delivery());
    let w2 = delivery_worker(db.new_pool(6).await, fast_delivery());
    wait_delivered(pool, EVENTS).await;
    w1.shutdown().await;
    w2.shutdown().await;

    let hits = rx.hits();
    assert!(hits.iter().all(|h| h.in_flight == 1), "a delivery was attempted twice at once");
    assert_eq!(rx.effects().len(), EVENTS);
    let successes = hits.iter().filter(|h| h.status == 200).count();
    assert_eq!(successes, EVENTS, "each event succeeded exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_disables_the_endpoint_and_publishes_an_operational_event() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|hit| if hit.endpoint == "gone" { Reply::Status(410) } else { Reply::Status(200) }).await;
    let gone = create_endpoint(pool, &local_endpoint(rx.url("gone"), ["order.created"])).await.unwrap();
    let ops = create_endpoint(pool, &local_endpoint(rx.url("ops"), [ENDPOINT_DISABLED_TOPIC])).await.unwrap();
    // Another tenant's catch-all endpoint must not learn of it.
    create_endpoint(pool, &local_endpoint(rx.url("all"), ["*"])).await.unwrap();
    publish(pool, &Event::new("order.created", &1).unwrap()).await.unwrap();
    let h = delivery_worker(db.new_pool(4).await, fast_delivery());

    eventually(Duration::from_secs(20), "the operational event to reach ops", || async {
        rx.hits().iter().any(|h| h.endpoint == "ops" && h.status == 200).then_some(())
    })
    .await;
    // A later event is not even queued for the disabled endpoint.
    let later = publish(pool, &Event::new("order.created", &2).unwrap()).await.unwrap();
    assert_eq!(later.deliveries, 1, "only the catch-all endpoint");
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;

    let ep = get_endpoint(pool, gone.id).await.unwrap();
    assert!(!ep.enabled);
    assert!(ep.disabled_reason.unwrap().contains("410"));
    assert_eq!(rx.hits().iter().filter(|h| h.endpoint == "gone").count(), 1, "410 is not retried");
    let ds = list_deliveries(pool, &DeliveryFilter { endpoint: Some(gone.id), ..Default::default() }).await.unwrap();
    assert_eq!((ds.len(), ds[0].state, ds[0].last_status), (1, DeliveryState::Dead, Some(410)));
    let op = rx.hits().into_iter().find(|h| h.endpoint == "ops").unwrap();
    let body: serde_json::Value = serde_json::from_slice(&op.body).unwrap();
    assert_eq!(body["type"], ENDPOINT_DISABLED_TOPIC);
    assert_eq!(body["data"]["endpoint_id"], gone.id.0);
    assert!(get_endpoint(pool, ops.id).await.unwrap().enabled);
    let all: Vec<String> = rx.hits().iter().filter(|h| h.endpoint == "all").map(|h| h.id.clone()).collect();
    assert_eq!(all.len(), 2, "the catch-all got both order events and not the operational one: {all:?}");
    assert!(!all.contains(&op.id));
}

/// With the default transport, an endpoint on a loopback address (as an endpoint aimed at the
/// service's own network or a metadata service would be) gets no request: its delivery goes to
/// the dead letter after one attempt, with the reason, and other endpoints are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_transport_refuses_non_public_addresses_for_good() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    // Created under a permissive policy, as an endpoint whose name only later resolves to a
    // private address would be: the transport still refuses it at delivery time.
    let inside = create_endpoint(pool, &local_endpoint(rx.url("inside"), ["*"])).await.unwrap();
    let by_name = create_endpoint(pool, &local_endpoint(rx.url("by-name").replace("127.0.0.1", "localhost"), ["*"]))
        .await
        .unwrap();
    let ev = publish(pool, &Event::new("order.created", &1).unwrap()).await.unwrap();
    assert_eq!(ev.deliveries, 2);
    let h = builder(db.new_pool(4).await)
        .register(WebhookDelivery::new(fast_delivery()))
        .queue(DEFAULT_DELIVERY_QUEUE, 4)
        .build()
        .unwrap()
        .start();
    wait_all_finished(pool, Duration::from_secs(20)).await;
    h.shutdown().await;

    assert_eq!(rx.hits().len(), 0, "no request left");
    for ep in [inside.id, by_name.id] {
        let ds = list_deliveries(pool, &DeliveryFilter { endpoint: Some(ep), ..Default::default() }).await.unwrap();
        assert_eq!((ds.len(), ds[0].state, ds[0].attempts), (1, DeliveryState::Dead, 1), "{ds:?}");
        let error = ds[0].last_error.as_deref().unwrap_or_default();
        assert!(error.contains("public address") && error.contains("allow_private_networks"), "{error}");
        assert!(ds[0].dead_reason.as_deref().is_some_and(|r| r.contains("public address")), "{:?}", ds[0]);
        let job = oncely::get_job(pool, ds[0].job_id).await.unwrap();
        assert_eq!(job.attempt, 1, "not retried: {:?}", job.errors);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_respected() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|hit| match hit.nth {
        1 => Reply::StatusRetryAfter(429, "2".into()),
        2 => Reply::StatusRetryAfter(503, "1".into()),
        _ => Reply::Status(200),
    })
    .await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    publish(pool, &Event::new("t", &0).unwrap()).await.unwrap();
    let h = delivery_worker(db.new_pool(4).await, fast_delivery());
    wait_delivered(pool, 1).await;
    h.shutdown().await;

    let mut hits = rx.hits();
    hits.sort_by_key(|h| h.nth);
    assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), vec![429, 503, 200]);
    // Without Retry-After the schedule would retry after at most 50 ms.
    let first_gap = hits[1].arrived - hits[0].arrived;
    let second_gap = hits[2].arrived - hits[1].arrived;
    assert!(first_gap >= Duration::from_secs(2), "{first_gap:?}");
    assert!(second_gap >= Duration::from_secs(1), "{second_gap:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ordered_delivery_keeps_order_per_key_under_failures() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx =
        Receiver::start(|_| if rand::rng().random_bool(0.35) { Reply::Status(500) } else { Reply::Status(200) }).await;
    create_endpoint(pool, &local_endpoint(rx.url("ordered"), ["*"]).ordered(true)).await.unwrap();
    let mut expected: HashMap<&str, Vec<String>> = HashMap::new();
    for i in 0..40 {
        let key = ["customer:1", "customer:2"][i % 2];
        let e = Event::new("t", &i).unwrap().ordering_key(key).max_attempts(60);
        expected.entry(key).or_default().push(publish(pool, &e).await.unwrap().message_id);
    }
    let h = delivery_worker(db.new_pool(8).await, fast_delivery());
    wait_delivered(pool, 40).await;
    h.shutdown().await;

    let effects: Vec<String> = rx.effects().into_iter().map(|(_, id)| id).collect();
    for ids in expected.values() {
        let got: Vec<&String> = effects.iter().filter(|id| ids.contains(id)).collect();
        assert_eq!(got, ids.iter().collect::<Vec<_>>(), "order within one key");
    }
    assert!(rx.hits().iter().any(|h| h.status == 500), "failures were injected");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_predecessor_does_not_use_or_raise_the_attempt_budget() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    // The head of the key fails its first four tries, so the events queued behind it wait (snooze)
    // again and again. Each event is allowed 5 attempts: waiting must cost none of them.
    let head_failures = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(4));
    let f = head_failures.clone();
    let rx = Receiver::start(move |_| {
        if f.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    create_endpoint(pool, &local_endpoint(rx.url("ordered"), ["*"]).ordered(true)).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        let e = Event::new("t", &i).unwrap().ordering_key("customer:1").max_attempts(5);
        ids.push(publish(pool, &e).await.unwrap().message_id);
    }
    let config = DeliveryConfig {
        schedule: RetrySchedule { delays: vec![Duration::from_millis(150)], jitter: 0.0 },
        ordered_wait: Duration::from_millis(20),
        ..fast_delivery()
    };
    let h = delivery_worker(db.new_pool(6).await, config);
    wait_delivered(pool, 10).await;
    h.shutdown().await;

    let effects: Vec<String> = rx.effects().into_iter().map(|(_, id)| id).collect();
    assert_eq!(effects, ids, "in order, each once");
    let deliveries = list_deliveries(pool, &DeliveryFilter::default()).await.unwrap();
    let mut waits = 0;
    for d in &deliveries {
        let job = oncely::get_job(pool, d.job_id).await.unwrap();
        assert_eq!(job.max_attempts, 5, "waiting never raises the budget: {job:?}");
        assert_eq!(job.counted_attempts(), d.attempts, "only requests sent count as attempts: {job:?}");
        assert!(job.counted_attempts() <= 5);
        waits += job.snoozes;
    }
    assert!(waits > 0, "the events behind the head waited");
    assert_eq!(deliveries.iter().map(|d| d.attempts).sum::<i32>(), 10 + 4, "ten successes and four failures");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_failing_past_the_limit_is_disabled_and_its_deliveries_can_be_redelivered() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = fail.clone();
    let rx = Receiver::start(move |_| {
        if f.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let ep = create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let ev = publish(pool, &Event::new("t", &0).unwrap().max_attempts(1000)).await.unwrap();
    let config = DeliveryConfig { disable_after: Duration::from_millis(500), ..fast_delivery() };
    let h = delivery_worker(db.new_pool(4).await, config);
    eventually(Duration::from_secs(20), "the endpoint to be disabled", || async {
        (!get_endpoint(pool, ep.id).await.ok()?.enabled).then_some(())
    })
    .await;
    wait_all_finished(pool, Duration::from_secs(20)).await;

    let d = &list_deliveries(pool, &DeliveryFilter { event: Some(ev.id), ..Default::default() }).await.unwrap()[0];
    assert_eq!(d.state, DeliveryState::Dead);
    assert!(d.attempts >= 2 && d.last_status == Some(500));
    let disabled: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.events WHERE topic = $1")
        .bind(ENDPOINT_DISABLED_TOPIC)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(disabled, 1, "one operational event");

    // A person fixes the receiver, enables the endpoint and redelivers: same webhook-id.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    webhook::enable_endpoint(pool, ep.id).await.unwrap();
    let job = redeliver(pool, ep.id, ev.id).await.unwrap();
    assert_ne!(job, d.job_id);
    wait_delivered(pool, 1).await;
    h.shutdown().await;
    assert_eq!(oncely::get_job(pool, job).await.unwrap().state, JobState::Completed);
    let hits = rx.hits();
    assert!(hits.iter().all(|h| h.id == ev.message_id));
    assert_eq!(hits.last().map(|h| h.status), Some(200));
    assert_eq!(rx.effects().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn during_a_rotation_both_secrets_sign_and_after_it_only_the_new_one() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    let ep = create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let old = ep.secret.as_str().to_owned();
    let new = WebhookSecret::generate();
    rotate_secret(pool, ep.id, &new, Duration::from_secs(3600)).await.unwrap();
    publish(pool, &Event::new("t", &1).unwrap()).await.unwrap();
    let h = delivery_worker(db.new_pool(4).await, fast_delivery());
    wait_delivered(pool, 1).await;

    let newer = WebhookSecret::generate();
    rotate_secret(pool, ep.id, &newer, Duration::ZERO).await.unwrap();
    publish(pool, &Event::new("t", &2).unwrap()).await.unwrap();
    wait_delivered(pool, 2).await;
    h.shutdown().await;

    let mut hits = rx.hits();
    hits.sort_by_key(|h| h.arrived);
    assert!(spec_verifies(&old, &hits[0]) && spec_verifies(new.as_str(), &hits[0]));
    assert_eq!(hits[0].signature.split(' ').count(), 2);
    assert!(spec_verifies(newer.as_str(), &hits[1]) && !spec_verifies(new.as_str(), &hits[1]));
    assert_eq!(hits[1].signature.split(' ').count(), 1);
    assert!(WebhookSecret::parse("whsec_short").is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_typed_errors_and_writes_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool();
    for bad in [
        NewEndpoint::new("ftp://x/y", ["t"]),
        NewEndpoint::new("http://x/", Vec::<String>::new()),
        // Addresses the default transport would refuse are refused when created.
        NewEndpoint::new("http://127.0.0.1:8080/hooks", ["t"]),
        NewEndpoint::new("https://[::1]/hooks", ["t"]),
        NewEndpoint::new("http://169.254.169.254/latest/meta-data", ["t"]),
        NewEndpoint::new("http://localhost:3000/hooks", ["t"]),
        // A scheme the transport cannot send.
        NewEndpoint::new("https://hooks.example.com/", ["t"]).policy(EndpointPolicy::default().schemes(["http"])),
    ] {
        assert!(matches!(create_endpoint(pool, &bad).await, Err(oncely::Error::InvalidInput(_))));
    }
    assert!(matches!(
        publish(pool, &Event::from_json("", serde_json::json!(1))).await,
        Err(oncely::Error::InvalidInput(_))
    ));
    assert!(matches!(
        get_endpoint(pool, webhook::EndpointId(999)).await,
        Err(oncely::Error::NotFound { what: "webhook endpoint", id: 999 })
    ));
    assert!(matches!(
        redeliver(pool, webhook::EndpointId(1), outbox::EventId(1)).await,
        Err(oncely::Error::NotFound { .. })
    ));
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM oncely.events) + (SELECT count(*) FROM oncely.webhook_endpoints)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(n, 0);
}

const CHILD_LEASE: Duration = Duration::from_secs(2);

/// Runs only as the child process of the SIGKILL test: a delivery worker.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawned by the SIGKILL delivery test as a child process"]
async fn child_delivery_worker() {
    let Ok(url) = std::env::var("ONCELY_CHILD_DATABASE_URL") else { return };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let config = DeliveryConfig { request_timeout: Duration::from_secs(60), ..fast_delivery() };
    let worker = oncely::Worker::builder(pool).register(local_delivery(config));
    run_child_worker(worker.queue(DEFAULT_DELIVERY_QUEUE, 1).lease(CHILD_LEASE)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_worker_killed_mid_request_delivers_again_with_the_same_id_and_the_effect_happens_once() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    // The receiver applies the effect, then hangs on the first request: the sender dies before it
    // learns the answer.
    let rx = Receiver::start(|hit| if hit.nth == 1 { Reply::Hang } else { Reply::Status(200) }).await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let ev =
        publish(pool, &Event::new("payment.succeeded", &serde_json::json!({"amount": 100})).unwrap()).await.unwrap();

    let mut child =
        spawn_child(concat!(module_path!(), "::child_delivery_worker"), &[("ONCELY_CHILD_DATABASE_URL", db.url())]);
    eventually(Duration::from_secs(30), "the child's request to arrive", || async {
        rx.hits().iter().any(|h| h.nth == 1).then_some(())
    })
    .await;
    child.start_kill().unwrap();
    assert!(!child.wait().await.unwrap().success());

    let h = builder(db.new_pool(4).await)
        .register(local_delivery(fast_delivery()))
        .queue(DEFAULT_DELIVERY_QUEUE, 4)
        .lease(CHILD_LEASE)
        .build()
        .unwrap()
        .start();
    wait_delivered(pool, 1).await;
    h.shutdown().await;

    let hits = rx.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert!(hits.iter().all(|h| h.id == ev.message_id), "the same webhook-id on both attempts");
    assert_eq!(rx.effects(), vec![("a".to_owned(), ev.message_id.clone())], "the receiver applied it once");
    let delivery =
        &list_deliveries(pool, &DeliveryFilter { event: Some(ev.id), ..Default::default() }).await.unwrap()[0];
    let job = oncely::get_job(pool, delivery.job_id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Completed, 2));
    assert_eq!(job.errors[0].kind, oncely::core::ErrorKind::LeaseExpired);
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_prunes_old_events_nothing_needs_and_old_inbox_records() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    create_endpoint(pool, &local_endpoint("http://127.0.0.1:9/hooks", ["*"])).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(publish(pool, &Event::new("t", &i).unwrap()).await.unwrap().id);
    }
    let (delivered, dead, job_pruned, recent) = (ids[0], ids[1], ids[2], ids[3]);
    let exec = |sql: &'static str, id: outbox::EventId| async move {
        sqlx::query(sql).bind(id).execute(pool).await.unwrap();
    };
    exec("UPDATE oncely.webhook_deliveries SET delivered_at = now() WHERE event_id = $1", delivered).await;
    exec(
        "DELETE FROM oncely.jobs WHERE id = (SELECT job_id FROM oncely.webhook_deliveries WHERE event_id = $1)",
        delivered,
    )
    .await;
    exec("UPDATE oncely.jobs SET state = 'dead', finished_at = now() WHERE id = (SELECT job_id FROM oncely.webhook_deliveries WHERE event_id = $1)", dead).await;
    exec(
        "DELETE FROM oncely.jobs WHERE id = (SELECT job_id FROM oncely.webhook_deliveries WHERE event_id = $1)",
        job_pruned,
    )
    .await;
    exec("UPDATE oncely.jobs SET state = 'cancelled', finished_at = now() WHERE id = (SELECT job_id FROM oncely.webhook_deliveries WHERE event_id = $1)", recent).await;
    sqlx::query("UPDATE oncely.events SET created_at = now() - interval '2 hours' WHERE id <> $1")
        .bind(recent)
        .execute(pool)
        .await
        .unwrap();
    for (id, age) in [("old", "2 hours"), ("new", "1 minute")] {
        let job = oncely::NewJob::from_json("noop", serde_json::json!({}));
        oncely::core::inbox::accept(pool, "stripe", id, &serde_json::json!({}), job).await.unwrap();
        sqlx::query(&format!("UPDATE oncely.inbox SET received_at = now() - interval '{age}' WHERE event_id = $1"))
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }

    let h = builder(db.new_pool(4).await)
        .register(oncely::handler_fn(|_ctx, _a: Noop| async { Ok(()) }))
        .queue("unused", 1)
        .configure(|c| {
            c.prune_interval = Duration::from_millis(100);
            c.event_retention = Duration::from_secs(3600);
            c.inbox_retention = Duration::from_secs(3600);
        })
        .build()
        .unwrap()
        .start();
    let left: Vec<i64> = eventually(Duration::from_secs(20), "old events and inbox records pruned", || async {
        let left: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM oncely.events ORDER BY id").fetch_all(pool).await.ok()?;
        let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.inbox").fetch_one(pool).await.ok()?;
        (left.len() <= 2 && inbox <= 1).then_some(left)
    })
    .await;
    h.shutdown().await;
    assert_eq!(left, vec![dead.0, recent.0], "a dead delivery keeps its event redeliverable; recent events stay");
    let inbox: Vec<String> = sqlx::query_scalar("SELECT event_id FROM oncely.inbox").fetch_all(pool).await.unwrap();
    assert_eq!(inbox, vec!["new".to_owned()]);
    let deliveries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM oncely.webhook_deliveries").fetch_one(pool).await.unwrap();
    assert_eq!(deliveries, 2, "delivery rows go with their events");
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_under_one_ordering_key_are_serialized_in_commit_order_and_other_keys_are_not() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let event = |key: &str| Event::new("t", &key).unwrap().ordering_key(key);

    let mut first = pool.begin().await.unwrap();
    let e1 = publish(&mut *first, &event("customer:1")).await.unwrap();
    let second_pool = db.new_pool(1).await;
    let second = tokio::spawn(async move {
        let mut tx = second_pool.begin().await.unwrap();
        let e = publish(&mut *tx, &event("customer:1")).await.unwrap();
        tx.commit().await.unwrap();
        e
    });
    eventually(Duration::from_secs(10), "the second publish to wait on the key's lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        (waiting == 1).then_some(())
    })
    .await;
    // Another key does not wait for the open transaction, and takes the next id meanwhile.
    let other = publish(&db.new_pool(1).await, &event("customer:2")).await.unwrap();
    assert!(other.id > e1.id);
    assert!(!second.is_finished());
    first.commit().await.unwrap();
    let e2 = second.await.unwrap();
    assert!(e2.id > other.id, "numbered after the first transaction committed");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_committed_after_a_later_one_was_delivered_is_still_delivered() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let h = delivery_worker(db.new_pool(4).await, fast_delivery());

    // The slow transaction takes the lower id and commits last.
    let mut slow = pool.begin().await.unwrap();
    let early = publish(&mut *slow, &Event::new("t", &"slow").unwrap()).await.unwrap();
    let late = publish(pool, &Event::new("t", &"fast").unwrap()).await.unwrap();
    assert!(early.id < late.id);
    eventually(Duration::from_secs(20), "the later event delivered", || async {
        rx.effects().iter().any(|(_, id)| *id == late.message_id).then_some(())
    })
    .await;
    slow.commit().await.unwrap();
    wait_delivered(pool, 2).await;
    h.shutdown().await;
    let ids: Vec<String> = rx.effects().into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, vec![late.message_id, early.message_id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_past_the_request_timeout_is_retried_with_the_same_id() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    // The first request is answered only after the sender gave up on it.
    let rx =
        Receiver::start(|hit| if hit.nth == 1 { Reply::SlowOk(Duration::from_secs(2)) } else { Reply::Status(200) })
            .await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let ev = publish(pool, &Event::new("t", &1).unwrap()).await.unwrap();
    let config = DeliveryConfig { request_timeout: Duration::from_millis(300), ..fast_delivery() };
    let h = delivery_worker(db.new_pool(4).await, config);
    wait_delivered(pool, 1).await;
    h.shutdown().await;

    let d = &list_deliveries(pool, &DeliveryFilter::default()).await.unwrap()[0];
    assert_eq!((d.attempts, d.last_status), (2, Some(200)));
    let job = oncely::get_job(pool, d.job_id).await.unwrap();
    assert!(job.errors[0].message.contains("no answer within"), "{:?}", job.errors);
    // The receiver applied the first attempt (then was too slow to say so); the retry carried the
    // same id, so it deduplicated it.
    assert_eq!(rx.effects(), vec![("a".to_owned(), ev.message_id.clone())]);
    let hits = rx.hits();
    assert_eq!((hits.len(), hits[0].nth, hits[0].id.as_str()), (1, 2, ev.message_id.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn events_waiting_behind_a_slow_retry_sleep_until_it_instead_of_polling() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|hit| {
        if hit.nth == 1 && hit.body.windows(5).any(|w| w == b"\"head") {
            Reply::StatusRetryAfter(503, "3".into())
        } else {
            Reply::Status(200)
        }
    })
    .await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"]).ordered(true)).await.unwrap();
    let head = publish(pool, &Event::new("t", &"head").unwrap().ordering_key("k")).await.unwrap();
    let mut behind = Vec::new();
    for i in 0..5 {
        behind.push(publish(pool, &Event::new("t", &i).unwrap().ordering_key("k")).await.unwrap());
    }
    let h = delivery_worker(db.new_pool(4).await, fast_delivery());
    wait_delivered(pool, 6).await;
    h.shutdown().await;

    let order: Vec<String> = rx.effects().into_iter().map(|(_, id)| id).collect();
    let expected: Vec<String> = std::iter::once(&head).chain(&behind).map(|p| p.message_id.clone()).collect();
    assert_eq!(order, expected);
    // With a 100 ms recheck, polling through the 3 s wait would snooze each about 30 times. They
    // sleep through it instead; once the head is delivered the chain unwinds with a few rechecks
    // each (an event checks while the one before it is still being woken).
    let snoozes: Vec<i32> = sqlx::query_scalar(
        "SELECT j.snoozes FROM oncely.webhook_deliveries d JOIN oncely.jobs j ON j.id = d.job_id WHERE d.event_id <> $1",
    )
    .bind(head.id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(snoozes.iter().all(|&s| s <= 12), "{snoozes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_many_stores_a_batch_in_input_order_and_fans_each_event_out() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    create_endpoint(pool, &local_endpoint(rx.url("all"), ["*"])).await.unwrap();
    create_endpoint(pool, &local_endpoint(rx.url("paid"), ["invoice.paid"]).ordered(true)).await.unwrap();
    let events: Vec<Event> = (0..300)
        .map(|i| {
            let topic = if i % 3 == 0 { "invoice.paid" } else { "invoice.created" };
            Event::new(topic, &i).unwrap().ordering_key(format!("customer:{}", i % 7))
        })
        .collect();
    // A rolled-back batch leaves nothing.
    let mut tx = pool.begin().await.unwrap();
    outbox::publish_many(&mut *tx, &events).await.unwrap();
    tx.rollback().await.unwrap();

    let published = outbox::publish_many(pool, &events).await.unwrap();
    assert_eq!(published.len(), 300);
    assert!(published.windows(2).all(|w| w[0].id < w[1].id), "ids follow the input");
    for (i, p) in published.iter().enumerate() {
        assert_eq!(p.deliveries, if i % 3 == 0 { 2 } else { 1 }, "event {i}");
        let stored = outbox::get_event(pool, p.id).await.unwrap();
        assert_eq!((stored.payload, stored.message_id.as_str()), (serde_json::json!(i), p.message_id.as_str()));
    }
    assert!(outbox::publish_many(pool, &[]).await.unwrap().is_empty());
    assert!(matches!(
        outbox::publish_many(pool, &[events[0].clone(), Event::from_json("bad topic", serde_json::json!(1))]).await,
        Err(oncely::Error::InvalidInput(_))
    ));

    let h = delivery_worker(db.new_pool(8).await, fast_delivery());
    wait_delivered(pool, 400).await;
    h.shutdown().await;
    // The ordered endpoint got each customer's paid invoices in input order.
    let paid: Vec<String> = rx.effects().into_iter().filter(|(e, _)| e == "paid").map(|(_, id)| id).collect();
    for customer in 0..7 {
        let want: Vec<&String> = published
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 0 && i % 7 == customer)
            .map(|(_, p)| &p.message_id)
            .collect();
        let got: Vec<&String> = paid.iter().filter(|id| want.contains(id)).collect();
        assert_eq!(got, want, "customer {customer}");
    }
}

/// Seed 004's "webhook:{event_id}, delivered only once": a request retried after a timeout, or
/// sent twice, must not publish twice (two events would carry two `webhook-id`s, which no receiver
/// can deduplicate). Publishing inside the request's once-per-key transaction does that: 10
/// concurrent attempts on separate connections publish one event with one delivery.
#[tokio::test(flavor = "multi_thread")]
async fn publishing_inside_a_once_per_key_transaction_publishes_once_across_retries() {
    init_tracing();
    let db = TestDb::new().await;
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    create_endpoint(db.pool(), &local_endpoint(rx.url("billing"), ["payment.succeeded"])).await.unwrap();
    let pool = db.new_pool(12).await;
    let attempts: Vec<_> = (0..10)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                oncely::core::with_idempotency_transactional(
                    &pool,
                    "webhook:payment:pi_42",
                    Duration::from_secs(3600),
                    |tx| {
                        Box::pin(async move {
                            let event =
                                Event::new("payment.succeeded", &serde_json::json!({"payment": "pi_42"})).unwrap();
                            publish(&mut *tx, &event).await.map(|p| p.message_id)
                        })
                    },
                )
                .await
            })
        })
        .collect();
    let ids: Vec<String> = futures::future::join_all(attempts).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert!(ids.iter().all(|id| id == &ids[0]), "every attempt answers with the one event's webhook-id: {ids:?}");
    let (events, jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM oncely.events), (SELECT count(*) FROM oncely.jobs WHERE kind = 'oncely.webhook_delivery')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((events, jobs), (1, 1));
}

/// A delivery worker whose lease was lost (its job rescued and claimed again by another worker)
/// cannot overwrite the newer attempt's record, nor disable the endpoint, nor mark the delivery
/// dead: each write is refused with LeaseLost, and the newer attempt's record stands.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_delivery_attempt_cannot_overwrite_the_newer_ones_record() {
    use oncely::core::lease::claim_jobs;
    use oncely::core::maintenance::rescue_expired;
    use oncely::core::webhook::{record_delivery_attempt, set_dead_reason, AttemptRecord};
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let ep = create_endpoint(pool, &local_endpoint("http://127.0.0.1:9/hook", ["*"])).await.unwrap();
    let ev = publish(pool, &Event::new("t", &1).unwrap()).await.unwrap();

    // Worker A claims the delivery job with a lease that runs out at once, and is rescued.
    let stale = claim_jobs(pool, DEFAULT_DELIVERY_QUEUE, 1, "worker-a", Duration::ZERO).await.unwrap();
    let stale = oncely::core::Claim::from(&stale[0]);
    eventually(Duration::from_secs(10), "A's job to be rescued", || async {
        let mut conn = pool.acquire().await.ok()?;
        (!rescue_expired(&mut conn, 10).await.ok()?.requeued.is_empty()).then_some(())
    })
    .await;
    // Worker B claims it again and records a success.
    let fresh = claim_jobs(pool, DEFAULT_DELIVERY_QUEUE, 1, "worker-b", Duration::from_secs(60)).await.unwrap();
    let fresh = oncely::core::Claim::from(&fresh[0]);
    assert_eq!((fresh.id, fresh.attempt), (stale.id, stale.attempt + 1));
    let ok = AttemptRecord { status: Some(200), error: None, delivered: true };
    let recorded = record_delivery_attempt(pool, fresh, ep.id, ev.id, &ok).await.unwrap();
    assert_eq!(recorded.attempts, 1);

    // A's answer arrives late: a 500. Every write it tries is refused.
    let late = AttemptRecord { status: Some(500), error: Some("HTTP 500".into()), delivered: false };
    let lost = |r: Result<_, oncely::Error>| matches!(r, Err(oncely::Error::LeaseLost { job_id, attempt }) if job_id == stale.id && attempt == stale.attempt);
    assert!(lost(record_delivery_attempt(pool, stale, ep.id, ev.id, &late).await.map(|_| ())));
    assert!(lost(set_dead_reason(pool, stale, ep.id, ev.id, "stale").await));
    assert!(lost(webhook::disable_endpoint_for_delivery(pool, stale, ep.id, ev.id, "failing").await.map(|_| ())));

    let d = &list_deliveries(pool, &DeliveryFilter { event: Some(ev.id), ..Default::default() }).await.unwrap()[0];
    assert_eq!((d.attempts, d.last_status, d.last_error.as_deref()), (1, Some(200), None));
    assert!(d.delivered_at.is_some() && d.dead_reason.is_none());
    let endpoint = get_endpoint(pool, ep.id).await.unwrap();
    assert!(endpoint.enabled && endpoint.failing_since.is_none(), "{endpoint:?}");
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.events").fetch_one(pool).await.unwrap();
    assert_eq!(published, 1, "no endpoint-disabled event");

    // A delivery that does not exist is NotFound, not LeaseLost.
    assert!(matches!(
        record_delivery_attempt(pool, fresh, ep.id, outbox::EventId(999), &ok).await,
        Err(oncely::Error::NotFound { .. })
    ));
}

/// A delivery that dies because its endpoint was disabled says so, and cannot be redelivered until
/// the endpoint is enabled again.
#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_killed_by_a_disabled_endpoint_says_why_and_redelivery_waits_for_enabling() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let rx = Receiver::start(|_| Reply::Status(200)).await;
    let ep = create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let ev = publish(pool, &Event::new("t", &1).unwrap()).await.unwrap();
    assert!(webhook::disable_endpoint(pool, ep.id, "receiver migrating").await.unwrap());
    let h = delivery_worker(db.new_pool(4).await, fast_delivery());
    wait_all_finished(pool, Duration::from_secs(20)).await;

    let d = &list_deliveries(pool, &DeliveryFilter { event: Some(ev.id), ..Default::default() }).await.unwrap()[0];
    assert_eq!((d.state, d.attempts), (DeliveryState::Dead, 0), "{d:?}");
    let reason = d.dead_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("disabled") && reason.contains("receiver migrating"), "{d:?}");
    assert!(rx.hits().is_empty());

    let refused = redeliver(pool, ep.id, ev.id).await;
    assert!(
        matches!(&refused, Err(oncely::Error::EndpointDisabled { endpoint, reason }) if *endpoint == ep.id.0 && reason == "receiver migrating"),
        "{refused:?}"
    );
    assert_eq!(list_deliveries(pool, &DeliveryFilter::default()).await.unwrap()[0].job_id, d.job_id, "nothing queued");

    webhook::enable_endpoint(pool, ep.id).await.unwrap();
    redeliver(pool, ep.id, ev.id).await.unwrap();
    wait_delivered(pool, 1).await;
    h.shutdown().await;
    let d = &list_deliveries(pool, &DeliveryFilter { event: Some(ev.id), ..Default::default() }).await.unwrap()[0];
    assert_eq!((d.attempts, d.dead_reason.as_deref()), (1, None), "redelivery clears the reason: {d:?}");
}

/// An endpoint that throttles every answer with `Retry-After: 1` for 30 s, then accepts: the
/// schedule's delays still apply (a short Retry-After does not shorten them), so the attempts
/// last the schedule's span and the event is delivered instead of dying after 8 quick attempts.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttling_endpoint_does_not_use_up_the_attempts_faster_than_the_schedule() {
    init_tracing();
    let db = TestDb::new().await;
    let pool = db.pool();
    let started = std::time::Instant::now();
    let rx = Receiver::start(move |hit| {
        if started.elapsed() < Duration::from_secs(30) {
            Reply::StatusRetryAfter(if hit.nth % 2 == 0 { 503 } else { 429 }, "1".into())
        } else {
            Reply::Status(200)
        }
    })
    .await;
    create_endpoint(pool, &local_endpoint(rx.url("a"), ["*"])).await.unwrap();
    let ev = publish(pool, &Event::new("t", &1).unwrap()).await.unwrap();
    // 8 attempts (the default) over 1 + 3 + 6 * 10 s = 64 s.
    let config = DeliveryConfig {
        schedule: RetrySchedule { delays: [1, 3, 10].map(Duration::from_secs).to_vec(), jitter: 0.0 },
        ..fast_delivery()
    };
    let h = delivery_worker(db.new_pool(4).await, config);
    wait_all_finished(pool, Duration::from_secs(90)).await;
    h.shutdown().await;

    let d = &list_deliveries(pool, &DeliveryFilter { event: Some(ev.id), ..Default::default() }).await.unwrap()[0];
    assert_eq!(d.state, DeliveryState::Delivered, "{d:?}");
    assert!(d.attempts <= 8, "{d:?}");
    let hits = rx.hits();
    assert_eq!(hits.len() as i32, d.attempts);
    assert!(hits.iter().filter(|h| h.status == 429 || h.status == 503).count() >= 2);
}
