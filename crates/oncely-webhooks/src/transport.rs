//! How a delivery attempt reaches the endpoint: the [`Transport`] trait, and [`HttpTransport`], a
//! pooled HTTP/1.1 client.
//!
//! `HttpTransport` speaks plain `http://` only, to keep TLS libraries out of this crate's build.
//! For `https://` endpoints, implement [`Transport`] over the client your service already uses
//! (a dozen lines over reqwest or hyper-rustls) and pass it to
//! [`WebhookDelivery::with_transport`](crate::WebhookDelivery::with_transport).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How much of a response body is read (the rest is dropped with the connection).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// How much of a response body is kept in the delivery record after a failure.
pub const RESPONSE_EXCERPT: usize = 256;

/// One attempt's request.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    /// The endpoint URL.
    pub url: String,
    /// Headers to send (`webhook-id`, `webhook-timestamp`, `webhook-signature`, content type).
    pub headers: Vec<(&'static str, String)>,
    /// The body, identical on every attempt.
    pub body: Bytes,
    /// The whole attempt's time limit: connect, send, and read the answer.
    pub timeout: Duration,
}

/// What the endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookResponse {
    /// The HTTP status.
    pub status: u16,
    /// The `Retry-After` header, as sent.
    pub retry_after: Option<String>,
    /// The start of the body (at most [`RESPONSE_EXCERPT`] bytes, lossy UTF-8).
    pub body_excerpt: String,
}

/// Why no answer came.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URL cannot be used by this transport; retrying will not help.
    #[error("cannot send to {url}: {reason}")]
    Unusable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No answer within the attempt's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, sending or reading failed.
    #[error("request failed: {0}")]
    Failed(String),
}

impl TransportError {
    /// True when retrying cannot succeed until someone changes the endpoint.
    pub fn is_permanent(&self) -> bool {
        matches!(self, TransportError::Unusable { .. })
    }
}

/// Sends one delivery attempt.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// POST `request` and return the answer, or why none came.
    async fn send(&self, request: WebhookRequest) -> Result<WebhookResponse, TransportError>;
}

/// A pooled HTTP/1.1 client for `http://` endpoints (keep-alive connections are reused).
#[derive(Clone)]
pub struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpTransport")
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpTransport {
    /// A client with a 10-second connect timeout and idle connections kept for 90 seconds.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        HttpTransport { client }
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn send(&self, request: WebhookRequest) -> Result<WebhookResponse, TransportError> {
        let unusable = |reason: String| TransportError::Unusable { url: request.url.clone(), reason };
        let uri: http::Uri = request.url.parse().map_err(|e| unusable(format!("invalid URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(unusable(
                "HttpTransport sends plain http:// only; give WebhookDelivery a TLS-capable Transport".into(),
            ));
        }
        let mut builder = http::Request::post(uri);
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let req = builder.body(Full::new(request.body.clone())).map_err(|e| unusable(e.to_string()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| TransportError::Failed(error_chain(&e)))?;
            let status = resp.status().as_u16();
            let retry_after =
                resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            // Read (a bounded amount of) the body so the connection can be reused.
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BODY).collect().await.map(|b| b.to_bytes());
            let excerpt = match &body {
                Ok(b) => String::from_utf8_lossy(&b[..b.len().min(RESPONSE_EXCERPT)]).into_owned(),
                Err(_) => String::new(),
            };
            Ok(WebhookResponse { status, retry_after, body_excerpt: excerpt })
        };
        tokio::time::timeout(request.timeout, exchange).await.map_err(|_| TransportError::Timeout(request.timeout))?
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
