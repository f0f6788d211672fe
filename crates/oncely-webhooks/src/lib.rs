//! oncely-webhooks: deliver outbox events to HTTP endpoints the Standard Webhooks way, and verify
//! such deliveries as a receiver.
//!
//! It depends on `oncely-core` (the outbox, endpoints and delivery records) and `oncely-worker`
//! (delivery runs as ordinary jobs: leases, fenced writes, rescue, the dead letter). Neither knows
//! of it; the HTTP client lives here so that services that only publish build no client.
//!
//! Delivery (the handler, the HTTP client, the worker) is the default feature `delivery`. A receiver
//! that only checks signatures depends on this crate with `default-features = false` and gets
//! [`signature`] alone: no worker, no HTTP client.
//!
//! - [`WebhookDelivery`]: the handler of delivery jobs. Register it on a worker serving the
//!   delivery queue ([`oncely_core::outbox::DEFAULT_DELIVERY_QUEUE`]).
//! - [`signature`]: sign (`webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`) and
//!   verify, with timestamp tolerance and rotated secrets.
//! - [`transport`]: the HTTP client behind it, replaceable (`http://` and `https://` out of the box,
//!   TLS by rustls with the web roots and any roots you add).
//!
//! What is promised, plainly: every event is delivered to every endpoint subscribed when it was
//! published, at least once, with the same `webhook-id` on every attempt — so a receiver that
//! deduplicates on `webhook-id` applies it once. Attempts follow a long schedule (seconds to hours)
//! and `Retry-After`; an endpoint that answers 410 or fails for days is disabled; deliveries that
//! run out of attempts stay in the dead letter until a person retries them.

#[cfg(feature = "delivery")]
pub mod delivery;
pub mod signature;
#[cfg(feature = "delivery")]
pub mod transport;

#[cfg(feature = "delivery")]
pub use delivery::{event_body, parse_retry_after, DeliverWebhook, DeliveryConfig, RetrySchedule, WebhookDelivery};
pub use signature::{sign, signature_header, verify, verify_headers, Verified, VerifyError};
#[cfg(feature = "delivery")]
pub use transport::{HttpTransport, HttpTransportBuilder, Transport, TransportError, WebhookRequest, WebhookResponse};
