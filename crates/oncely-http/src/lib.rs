//! oncely-http: `Idempotency-Key` middleware for tower and axum, on oncely's effect ledger.
//!
//! It depends on `oncely-core` (the ledger, over sqlx and Tokio), the `http` and `http-body` types
//! and tower's `Layer` and `Service` traits (not tower itself); axum only with the `axum` feature.
//! The worker runtime is not involved.
//!
//! A request with a key runs once per (caller scope, key); repeats get the stored status, safe
//! headers and body, byte for byte, with `Idempotency-Replayed: true`. A key reused with a
//! different request gets 422 (or 409), a key whose first request is still running gets 409 with
//! `Retry-After` (or waits and replays), a malformed key 400, an oversize body 413 — each as
//! `application/problem+json` with a request id. See `docs/idempotency.md`.
//!
//! What can go wrong, plainly: in the default mode the handler's effects and the stored response
//! are two writes. A process that dies between them leaves the key in progress until its lease ends
//! (60 s by default); a retry after that runs the handler again. [`IdempotencyLayer::transactional`]
//! closes that window for effects in the same PostgreSQL: the handler writes through the request's
//! transaction ([`RequestTx`]), and the layer stores the response in it before committing.

pub mod config;
mod execution;
pub mod key;
pub mod problem;
mod service;
pub mod store;
mod tx;

pub use config::{ClientAddr, IdempotencyConfig, InFlight, MissingKey, Principal};
pub use execution::Execution;
pub use service::{
    fingerprint, request_id, Idempotency, IdempotencyLayer, InnerBody, ResponseBody, IDEMPOTENCY_KEY,
    IDEMPOTENCY_REPLAYED, MAX_REQUEST_ID_LEN, REQUEST_ID,
};
pub use store::{IdempotencyStore, MemoryStore, PgStore, StoreClaim, StoreError, StoredResponse};
#[cfg(feature = "axum")]
pub use tx::MissingRequestTx;
pub use tx::{RequestTx, RequestTxClosed, TxConn, TX_REJECT_LOCK_WAIT};
