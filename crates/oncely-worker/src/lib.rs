//! oncely-worker: the runtime that runs jobs from the oncely queue.
//!
//! It depends on `oncely-core` (the queue and its fenced writes) and on Tokio; core knows nothing of
//! it, so services that only enqueue need not pull in a runtime.
//!
//! A [`Worker`] serves queues with a concurrency limit each. Per queue, a fetcher claims jobs in
//! batches with `FOR UPDATE SKIP LOCKED` and a lease; the executor runs each job's [`Handler`] under
//! a timeout, catching panics; completions are written in batches, and every other outcome
//! ([`Outcome`]) with one fenced statement. A heartbeat extends leases; the elected maintenance
//! leader rescues jobs whose lease expired (a dead worker's) and prunes old finished jobs.
//! LISTEN/NOTIFY wakes idle fetchers, with polling as the fallback.
//!
//! What can go wrong, plainly: delivery is **at least once**. A worker that dies, or loses the
//! database for longer than its lease, has its jobs run again elsewhere; its own later writes are
//! refused ([`oncely_core::Error::LeaseLost`]). A handler whose lease is lost is told to stop
//! ([`JobContext::cancelled`]) and dropped if it still runs after
//! [`WorkerConfig::lease_lost_grace`]. Handlers must therefore be safe to repeat — which is what
//! steps and the effect ledger are for, and [`JobContext::complete_in`], which completes the job in
//! the handler's own transaction.

pub mod child;
mod completer;
pub mod config;
pub mod error;
mod executor;
mod fetcher;
pub mod flow;
pub mod function;
pub mod handler;
mod heartbeat;
pub mod listener;
pub mod maintenance;
pub mod metrics;
mod prefetch;
mod worker;

pub use config::{QueueConfig, WorkerConfig};
pub use error::{Error, Result};
pub use function::{Clock, FunctionHandler};
pub use handler::{handler_fn, FnHandler, Handler, HandlerResult, JobContext, Outcome, ResultExt};
pub use oncely_core::pooler::Pooler;
#[doc(hidden)]
pub use worker::CompletionHook;
pub use worker::{Worker, WorkerBuilder, WorkerHandle, WorkerStats};
