//! `/metrics` after a drain: the worker's counters and histograms, the queue gauges, step outcomes,
//! webhook deliveries and endpoint disables, a lost lease, and the Idempotency-Key layer's
//! counters, in Prometheus text. One test in this binary: the recorder is process-wide.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use common::receiver::{Receiver, Reply};
use common::*;
use http::Request;
use http_body_util::BodyExt;
use oncely::core::outbox::{publish, Event, DEFAULT_DELIVERY_QUEUE};
use oncely::core::webhook::{create_endpoint, get_endpoint, EndpointPolicy, NewEndpoint};
use oncely::dashboard::{telemetry, Dashboard};
use oncely::{enqueue, handler_fn, JobArgs, NewJob, Outcome};
use oncely_webhooks::{DeliveryConfig, HttpTransport, RetrySchedule, WebhookDelivery};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

#[derive(Debug, Serialize, Deserialize)]
struct Good {
    n: u32,
}
impl JobArgs for Good {
    const KIND: &'static str = "good";
}

#[derive(Debug, Serialize, Deserialize)]
struct Flaky {
    n: u32,
}
impl JobArgs for Flaky {
    const KIND: &'static str = "flaky";
}

/// The jobs of the claim-timing worker (a kind of their own, so the counts above stay as they are).
#[derive(Debug, Serialize, Deserialize)]
struct Timed {
    n: u32,
}
impl JobArgs for Timed {
    const KIND: &'static str = "timed";
}

#[derive(Debug, Serialize, Deserialize)]
struct Held;
impl JobArgs for Held {
    const KIND: &'static str = "held";
}

/// The value of the sample named exactly `series` (name and labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_a_drain_have_the_right_counts() {
    init_tracing();
    let handle = telemetry::install_prometheus().expect("the only recorder in this test binary");
    let db = TestDb::new().await;
    let pool = db.pool();
    for n in 0..5 {
        enqueue(pool, NewJob::new(&Good { n }).unwrap()).await.unwrap();
    }
    // Two flaky jobs: one fails once then succeeds, one has a single attempt and dies.
    enqueue(pool, NewJob::new(&Flaky { n: 0 }).unwrap().max_attempts(3)).await.unwrap();
    enqueue(pool, NewJob::new(&Flaky { n: 1 }).unwrap().max_attempts(1)).await.unwrap();
    // A sixth good job, claimed by a worker that died: its lease ran out a minute ago. The
    // worker's maintenance rescues it (`oncely_jobs_rescued_total`), then it runs.
    let orphan = enqueue(pool, NewJob::new(&Good { n: 5 }).unwrap()).await.unwrap().id;
    sqlx::query(
        "UPDATE oncely.jobs SET state = 'running', attempt = 1, attempted_at = now(), worker_id = 'gone', \
         lease_expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(orphan)
    .execute(pool)
    .await
    .unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let t = tries.clone();
    let drain = builder(pool.clone())
        .register(handler_fn(|_ctx, _g: Good| async { Ok(()) }))
        .register(handler_fn(move |ctx, f: Flaky| {
            let t = t.clone();
            async move {
                t.fetch_add(1, Ordering::SeqCst);
                if f.n == 1 || ctx.attempt() == 1 {
                    return Err(Outcome::retry("flaky"));
                }
                Ok(())
            }
        }))
        .queue("default", 2);
    oncely::testkit::run_until_idle(pool, drain, Duration::from_secs(60)).await;
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    // Due in an hour: after the drain: available, not yet due.
    // Step outcomes, outside any job (the idempotency namespace) and of a job's parked step.
    let ttl = Duration::from_secs(3600);
    for _ in 0..2 {
        let v = oncely::with_idempotency(pool, "metrics:once", ttl, || async { Ok::<_, std::io::Error>(7) }).await;
        assert_eq!(v.unwrap(), 7, "recorded, then replayed");
    }
    let failed = oncely::with_idempotency_transactional(pool, "metrics:fails", ttl, |_tx| {
        Box::pin(async { Err::<i32, _>(std::io::Error::other("no")) })
    })
    .await;
    assert!(failed.is_err());
    claim_record(pool, "step", "job:777:charge", Duration::ZERO, None).await;
    let parked = oncely::core::step::StepScope::new(pool.clone(), oncely::JobId(777), 2)
        .step("charge")
        .external(oncely::OnUnknown::Park, |_key| async { Ok::<_, std::io::Error>(1) })
        .await;
    assert!(matches!(parked, Err(oncely::StepError::OutcomeUnknown { .. })), "{parked:?}");
    // The Idempotency-Key layer: one request in flight, its duplicate rejected, then replayed, then
    // the key reused with another body.
    {
        use axum::routing::post;
        use oncely::http::{IdempotencyLayer, MemoryStore};
        let started = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (s, r) = (started.clone(), release.clone());
        let app = axum::Router::new()
            .route(
                "/things",
                post(move |body: String| {
                    let (s, r) = (s.clone(), r.clone());
                    async move {
                        s.notify_one();
                        r.notified().await;
                        (http::StatusCode::CREATED, body)
                    }
                }),
            )
            .layer(IdempotencyLayer::new(MemoryStore::default()));
        let req = |body: &str| {
            Request::post("/things")
                .header("idempotency-key", "metrics-key")
                .header("authorization", "Bearer t")
                .body(Body::from(body.to_owned()))
                .unwrap()
        };
        let first = tokio::spawn(app.clone().oneshot(req("a")));
        tokio::time::timeout(Duration::from_secs(10), started.notified()).await.expect("the first request runs");
        let dup = app.clone().oneshot(req("a")).await.unwrap();
        assert_eq!(dup.status(), http::StatusCode::CONFLICT, "a duplicate in flight");
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), http::StatusCode::CREATED);
        let replay = app.clone().oneshot(req("a")).await.unwrap();
        assert_eq!(replay.status(), http::StatusCode::CREATED, "replayed");
        let reused = app.clone().oneshot(req("b")).await.unwrap();
        assert!(reused.status().is_client_error(), "the key reused with another body: {}", reused.status());
    }
    // Webhook deliveries: endpoint "ok" answers 200; "flaky" answers 500 once, then 200 (retried);
    // "gone" answers 410 and is disabled.
    let rx = Receiver::start(|hit| match (hit.endpoint.as_str(), hit.nth) {
        ("ok", _) | ("flaky", 2..) => Reply::Status(200),
        ("flaky", _) => Reply::Status(500),
        _ => Reply::Status(410),
    })
    .await;
    let mut endpoints = Vec::new();
    for name in ["ok", "flaky", "gone"] {
        let new = NewEndpoint::new(rx.url(name), [format!("metrics.{name}")])
            .policy(EndpointPolicy::default().allow_private_networks(true));
        endpoints.push(create_endpoint(pool, &new).await.unwrap().id);
        publish(pool, &Event::new(format!("metrics.{name}"), &serde_json::json!({"to": name})).unwrap()).await.unwrap();
    }
    let delivery = WebhookDelivery::with_transport(
        DeliveryConfig {
            request_timeout: Duration::from_secs(5),
            schedule: RetrySchedule { delays: vec![Duration::from_millis(20)], jitter: 0.0 },
            ..DeliveryConfig::default()
        },
        HttpTransport::new().allow_private_networks(),
    );
    let deliveries = builder(pool.clone()).register(delivery).queue(DEFAULT_DELIVERY_QUEUE, 4);
    oncely::testkit::run_until_idle(pool, deliveries, Duration::from_secs(60)).await;
    let answered: Vec<(String, u16)> = rx.hits().into_iter().map(|h| (h.endpoint, h.status)).collect();
    assert_eq!(answered.len(), 4, "{answered:?}");
    assert!(!get_endpoint(pool, endpoints[2]).await.unwrap().enabled, "410 disabled the endpoint");
    assert!(get_endpoint(pool, endpoints[1]).await.unwrap().enabled, "a 5xx does not disable it");

    // A lost lease: a person cancels a job while its handler runs. The heartbeat tells the handler
    // to stop (one), and the completion it then returns is refused (two).
    let started = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::new(tokio::sync::Notify::new());
    let (s, st) = (started.clone(), stopped.clone());
    let held = builder(pool.clone())
        .register(handler_fn(move |ctx, _h: Held| {
            let (s, st) = (s.clone(), st.clone());
            async move {
                s.notify_one();
                ctx.cancelled().await;
                st.notify_one();
                Ok(())
            }
        }))
        .queue("held", 1)
        .build()
        .unwrap()
        .start();
    let held_id = enqueue(pool, NewJob::new(&Held).unwrap().queue("held")).await.unwrap().id;
    tokio::time::timeout(Duration::from_secs(20), started.notified()).await.expect("the held job runs");
    oncely::cancel_job(&mut pool.acquire().await.unwrap(), held_id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), stopped.notified()).await.expect("the heartbeat stops the handler");
    held.shutdown().await;
    assert_eq!(oncely::get_job(pool, held_id).await.unwrap().state, oncely::JobState::Cancelled);

    enqueue(pool, NewJob::new(&Good { n: 99 }).unwrap().queue("later").delay(Duration::from_secs(3600))).await.unwrap();

    // Claim timing: a worker of its own on queue "timed", so that its stats and the histogram's
    // series for that queue count the same claim statements.
    let timed = builder(pool.clone())
        // Each handler yields once, so that jobs handed out together overlap (without it each
        // runs to its end before the next is polled, and none ever waits for a slot).
        .register(handler_fn(|_ctx, _t: Timed| async {
            tokio::task::yield_now().await;
            Ok(())
        }))
        .queue("timed", 4)
        .build()
        .unwrap()
        .start();
    for n in 0..10 {
        enqueue(pool, NewJob::new(&Timed { n }).unwrap().queue("timed")).await.unwrap();
    }
    eventually(Duration::from_secs(30), "the first ten timed jobs done", || async {
        (oncely::worker::WorkerStats::get(&timed.stats().completed) == 10).then_some(())
    })
    .await;
    // Then 500 at once: with jobs of no work measured, the adaptive prefetch claims ahead of the
    // four slots, and jobs wait for one.
    let more: Vec<NewJob> = (10..510).map(|n| NewJob::new(&Timed { n }).unwrap().queue("timed")).collect();
    oncely::enqueue_many(pool, &more).await.unwrap();
    eventually(Duration::from_secs(30), "the timed queue drained", || async {
        (oncely::worker::WorkerStats::get(&timed.stats().completed) == 510).then_some(())
    })
    .await;
    timed.shutdown().await;
    let ahead = oncely::worker::WorkerStats::get(&timed.stats().claimed_ahead);
    assert!(ahead > 0, "no timed job was claimed ahead of the four slots");
    let (claims, claim_micros) = (
        oncely::worker::WorkerStats::get(&timed.stats().claims),
        oncely::worker::WorkerStats::get(&timed.stats().claim_micros),
    );
    assert!(claims >= 1 && claim_micros >= claims, "{claims} claims took {claim_micros} µs in all");

    let app = Dashboard::new(pool.clone()).metrics(handle).router();
    let res = app.oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), 200);
    let text = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();

    let expect = [
        ("oncely_jobs_completed_total{kind=\"good\"}", 6.0),
        ("oncely_jobs_rescued_total", 1.0),
        ("oncely_jobs_completed_total{kind=\"flaky\"}", 1.0),
        ("oncely_jobs_failed_total{kind=\"flaky\"}", 2.0),
        ("oncely_jobs_retried_total{kind=\"flaky\"}", 1.0),
        ("oncely_jobs_dead_total{kind=\"flaky\"}", 1.0),
        ("oncely_handler_duration_seconds_count{kind=\"good\"}", 6.0),
        ("oncely_handler_duration_seconds_count{kind=\"flaky\"}", 3.0),
        ("oncely_job_start_latency_seconds_count{queue=\"default\"}", 9.0),
        ("oncely_queue_depth{queue=\"default\",state=\"dead\"}", 1.0),
        ("oncely_queue_depth{queue=\"default\",state=\"available\"}", 0.0),
        ("oncely_queue_depth{queue=\"later\",state=\"available\"}", 1.0),
        ("oncely_queue_oldest_available_age_seconds{queue=\"later\"}", 0.0),
        ("oncely_idempotency_replays_total", 1.0),
        ("oncely_idempotency_conflicts_total", 1.0),
        ("oncely_idempotency_in_flight_rejections_total", 1.0),
        ("oncely_step_outcomes_total{namespace=\"idempotency\",outcome=\"recorded\"}", 1.0),
        ("oncely_step_outcomes_total{namespace=\"idempotency\",outcome=\"replayed\"}", 1.0),
        ("oncely_step_outcomes_total{namespace=\"idempotency\",outcome=\"failed\"}", 1.0),
        ("oncely_step_outcomes_total{namespace=\"step\",outcome=\"parked\"}", 1.0),
        ("oncely_webhook_deliveries_total{status_class=\"2xx\"}", 2.0),
        ("oncely_webhook_deliveries_total{status_class=\"5xx\"}", 1.0),
        ("oncely_webhook_deliveries_total{status_class=\"4xx\"}", 1.0),
        ("oncely_webhook_endpoint_disables_total", 1.0),
        ("oncely_lease_lost_total", 2.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert!(text.contains("# TYPE oncely_handler_duration_seconds histogram"), "{text}");
    let batches = sample(&text, "oncely_claim_batch_size_sum{queue=\"default\"}").expect("claim batch sizes");
    assert_eq!(batches, 9.0, "every claimed attempt is in one batch");
    assert_eq!(sample(&text, "oncely_webhook_deliveries_total{status_class=\"error\"}"), None, "no transport error");

    // Every claim statement of the timed worker is in the histogram, under its kind; its first
    // claim is a full one (a new window has no floors).
    let timed_series = |kind: &str| {
        sample(&text, &format!("oncely_claim_duration_seconds_count{{queue=\"timed\",claim=\"{kind}\"}}"))
            .unwrap_or(0.0)
    };
    let by_kind = ["window", "full", "flow"].map(timed_series);
    assert!(by_kind[1] >= 1.0, "a full claim first: {by_kind:?}\n{text}");
    assert_eq!(by_kind.iter().sum::<f64>(), claims as f64, "{by_kind:?} against the worker's {claims} claims");
    let timed_seconds = ["window", "full", "flow"]
        .map(|kind| {
            sample(&text, &format!("oncely_claim_duration_seconds_sum{{queue=\"timed\",claim=\"{kind}\"}}"))
                .unwrap_or(0.0)
        })
        .iter()
        .sum::<f64>();
    assert!(
        (timed_seconds * 1e6 - claim_micros as f64).abs() <= claims as f64,
        "the histogram's {timed_seconds} s against the stats' {claim_micros} µs"
    );
    // The jobs claimed ahead, and the allowance that let them be.
    assert_eq!(
        sample(&text, "oncely_jobs_claimed_ahead_total{queue=\"timed\"}"),
        Some(ahead as f64),
        "against the worker's {ahead} jobs claimed ahead\n{text}"
    );
    let allowance = sample(&text, "oncely_prefetch_allowance{queue=\"timed\"}").expect("the timed queue's allowance");
    assert!(allowance > 0.0 && allowance <= 256.0, "allowance {allowance}");
}
