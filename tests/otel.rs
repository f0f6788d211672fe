//! Tracing across the queue with OpenTelemetry (feature `otel`): a span around the enqueue, a
//! worker that runs the job and its step, and the SDK's in-memory exporter, which must show one
//! trace from the request through the job to the step. A binary of its own: it installs the
//! process-wide `tracing` subscriber with the OpenTelemetry layer.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::*;
use oncely::{enqueue, enqueue_many, handler_fn, JobArgs, JobId, NewJob};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Serialize, Deserialize)]
struct Charge {
    n: u32,
}
impl JobArgs for Charge {
    const KIND: &'static str = "charge";
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned())
}

/// The exported `job` span of job `id`, once it has ended.
async fn job_span(exporter: &InMemorySpanExporter, id: JobId) -> SpanData {
    eventually(Duration::from_secs(20), "the job's span is exported", || async {
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "job" && attr(s, "job.id").as_deref() == Some(id.to_string().as_str()))
    })
    .await
}

async fn stored(pool: &sqlx::PgPool, id: JobId) -> Option<String> {
    sqlx::query_scalar("SELECT traceparent FROM oncely.jobs WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_runs_from_the_request_through_the_job_and_its_step() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("oncely-test")))
        .with(tracing_subscriber::EnvFilter::new("info"))
        .init();
    let db = TestDb::new().await;
    let pool = db.pool();

    // An HTTP request's span enqueues a job; another enqueues a batch; a third job has no span.
    let request = tracing::info_span!("http_request");
    let request_trace: TraceId = request.context().span().span_context().trace_id();
    let request_id: SpanId = request.context().span().span_context().span_id();
    let one = enqueue(pool, NewJob::new(&Charge { n: 1 }).unwrap()).instrument(request.clone()).await.unwrap().id;
    drop(request);
    let batch_request = tracing::info_span!("batch_request");
    let batch_trace = batch_request.context().span().span_context().trace_id();
    let batch: Vec<JobId> =
        enqueue_many(pool, &[NewJob::new(&Charge { n: 2 }).unwrap(), NewJob::new(&Charge { n: 3 }).unwrap()])
            .instrument(batch_request.clone())
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
    drop(batch_request);
    // An enqueue with no span of the caller's around it.
    let untraced = enqueue(pool, NewJob::new(&Charge { n: 4 }).unwrap()).await.unwrap().id;
    assert_ne!(request_trace, batch_trace);

    // What was stored: the enqueue span's context (a child of the request's span, same trace).
    let tp1 = stored(pool, one).await.expect("the enqueue stored the current span's traceparent");
    assert_eq!(&tp1[3..35], request_trace.to_string(), "{tp1}");
    let enqueue_span = eventually(Duration::from_secs(10), "the enqueue span is exported", || async {
        exporter.get_finished_spans().unwrap().into_iter().find(|s| s.name == "enqueue")
    })
    .await;
    assert_eq!(enqueue_span.parent_span_id, request_id, "the enqueue span is the request's child");
    assert_eq!(&tp1[36..52], enqueue_span.span_context.span_id().to_string());
    for id in &batch {
        let tp = stored(pool, *id).await.expect("enqueue_many stored the batch span's traceparent");
        assert_eq!(&tp[3..35], batch_trace.to_string());
    }
    // Outside any span of the caller's, the enqueue's own span is a trace's root: its context.
    let lone_tp = stored(pool, untraced).await.expect("the enqueue span's traceparent");
    assert!(![request_trace.to_string(), batch_trace.to_string()].contains(&lone_tp[3..35].to_owned()));

    // The worker runs each job with a step.
    let builder = builder(pool.clone())
        .register(handler_fn(|ctx, c: Charge| async move {
            ctx.step("charge_card").run(|| async move { Ok::<_, Infallible>(c.n) }).await?;
            Ok(())
        }))
        .queue("default", 2);
    let drained = oncely::testkit::run_until_idle(pool, builder, Duration::from_secs(30)).await;
    assert_eq!(drained.completed, 4);

    // The job's span is in the request's trace, a child of the enqueue span, and linked to it.
    let job = job_span(&exporter, one).await;
    assert_eq!(job.span_context.trace_id(), request_trace, "the job's span continues the request's trace");
    assert_eq!(job.parent_span_id, enqueue_span.span_context.span_id());
    assert_eq!(attr(&job, "traceparent").as_deref(), Some(tp1.as_str()));
    let links: Vec<_> = job.links.iter().map(|l| (l.span_context.trace_id(), l.span_context.span_id())).collect();
    assert_eq!(links, [(request_trace, enqueue_span.span_context.span_id())], "the job's span links the enqueue");
    // The step's span is the job span's child, in the same trace.
    let step = eventually(Duration::from_secs(10), "the step's span is exported", || async {
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "step" && s.parent_span_id == job.span_context.span_id())
    })
    .await;
    assert_eq!(step.span_context.trace_id(), request_trace);
    assert_eq!(attr(&step, "step").as_deref(), Some("charge_card"));

    // Each job of the batch continues the batch's trace.
    for id in &batch {
        assert_eq!(job_span(&exporter, *id).await.span_context.trace_id(), batch_trace);
    }
    // The job enqueued outside any span continues its enqueue span's trace, no other.
    let lone = job_span(&exporter, untraced).await;
    assert_eq!(lone.span_context.trace_id().to_string(), lone_tp[3..35]);
    assert_eq!(lone.parent_span_id.to_string(), lone_tp[36..52]);
}
