//! The integration tests, as one test binary: one link instead of one per file, which is most of
//! the time an incremental `cargo test` takes (docs/benchmarks.md, "Test build time"). Each file is
//! a module; run one with `cargo test --test it -- queue::`. `tests/signal.rs`,
//! `tests/webhook_secrets.rs` and `tests/metrics.rs` stay binaries of their own: one signals its own
//! process, one installs a process-wide key ring, one the process-wide metrics recorder.

#[path = "../common/mod.rs"]
mod common;
/// The report pipeline of `examples/report_pipeline`, shared by the modules that run it.
#[path = "../../examples/report_pipeline/pipeline.rs"]
mod pipeline;

mod api;
mod cancel_safety;
mod children;
mod claim_window;
mod crash;
mod dashboard;
mod debounce;
mod errors;
mod example_restart;
mod external;
mod fencing;
mod flow;
mod flow_keys;
mod functions;
mod harness;
mod http;
mod http_crash;
mod inbox;
mod migrate;
mod outage;
mod pgbouncer;
mod pipeline_crash;
mod plans;
mod prefetch;
mod queue;
mod report_events;
mod sql_api;
mod steps;
mod trace;
mod waits;
mod webhooks;
mod webhooks_tls;
mod worker;
