//! How a delivery attempt reaches the endpoint: the [`Transport`] trait, and [`HttpTransport`], a
//! pooled HTTP/1.1 client for `http://` and `https://` endpoints.
//!
//! TLS is rustls with the `ring` provider (no OpenSSL, no system libraries), trusting the Mozilla
//! root certificates compiled in from `webpki-roots`, plus any root you add with
//! [`HttpTransportBuilder::add_root_certificate_pem`] (a private CA, a test certificate). A
//! certificate that does not chain to those roots, has expired, or does not name the endpoint's
//! host fails the attempt with the reason (e.g. `invalid peer certificate: UnknownIssuer`), which is
//! recorded on the delivery; the attempt is retried on the schedule, since certificates get fixed.
//!
//! Endpoint URLs come from your users, so by default `HttpTransport` connects to public addresses
//! only: an endpoint naming a loopback, private, link-local (e.g. a cloud metadata service),
//! shared, multicast or reserved address, by IP or through a host name that resolves to one, is
//! refused with [`TransportError::Unusable`] and its delivery goes to the dead letter with the
//! reason. The check applies to the addresses the connection is made to (a name is resolved once
//! and only its public addresses are tried, for `http://` and `https://` alike: TLS runs over the
//! connection made to the checked address), so a name that resolves differently on the next lookup
//! cannot slip past it. [`HttpTransportBuilder::allow_private_networks`] lifts it, for endpoints
//! inside your own network and for tests. A `Transport` of your own should apply the same rule, and
//! report it through [`Transport::endpoint_policy`] so endpoints it would refuse are refused when
//! created.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
pub use oncely_core::webhook::is_public_address;
use oncely_core::webhook::EndpointPolicy;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

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
    /// Connecting, sending or reading failed (including TLS: an untrusted or mismatched
    /// certificate).
    #[error("request failed: {0}")]
    Failed(String),
    /// The transport's settings are unusable (e.g. a root certificate that does not parse).
    #[error("invalid transport settings: {0}")]
    Config(String),
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

    /// The endpoint URLs this transport can send to, for
    /// [`NewEndpoint::policy`](oncely_core::webhook::NewEndpoint::policy): endpoints it would
    /// refuse are then refused when created. Defaults to [`EndpointPolicy::default`] (`http` and
    /// `https`, public addresses only).
    fn endpoint_policy(&self) -> EndpointPolicy {
        EndpointPolicy::default()
    }
}

/// A pooled HTTP/1.1 client for `http://` and `https://` endpoints (keep-alive connections are
/// reused), that connects to public addresses only unless told otherwise (see the
/// [module docs](self)).
///
/// # Example
///
/// ```
/// use oncely_webhooks::HttpTransport;
/// # fn main() -> Result<(), oncely_webhooks::TransportError> {
/// // Public endpoints over http:// or https://, trusting the built-in web roots:
/// let public = HttpTransport::new();
/// // Your own services too, signed by your own CA:
/// # let ca_pem = "";
/// # if !ca_pem.is_empty() {
/// let internal = HttpTransport::builder().allow_private_networks(true).add_root_certificate_pem(ca_pem.as_bytes())?.build()?;
/// # }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpTransport {
    client: Client<HttpsConnector<HttpConnector<PublicOnly>>, Full<Bytes>>,
    allow_private: bool,
    extra_roots: usize,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("allow_private_networks", &self.allow_private)
            .field("extra_roots", &self.extra_roots)
            .finish_non_exhaustive()
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        Self::new()
    }
}

/// Defaults to 10 s: the connect timeout of [`HttpTransport`] (TCP only; TLS and the exchange count
/// against the attempt's timeout).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Defaults to 90 s: how long an idle keep-alive connection is kept.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

impl HttpTransport {
    /// A client for public addresses over `http://` and `https://` (web roots), with a 10-second
    /// connect timeout and idle connections kept for 90 seconds.
    pub fn new() -> Self {
        HttpTransport::builder().build().expect("the default settings are valid")
    }

    /// Settings beyond the defaults: private networks, extra root certificates.
    pub fn builder() -> HttpTransportBuilder {
        HttpTransportBuilder::default()
    }

    /// The same client, allowed to connect to any address: loopback, private networks,
    /// link-local. Use it only when every endpoint URL is trusted (your own services, tests).
    /// Keeps no extra roots; use [`HttpTransport::builder`] for both.
    pub fn allow_private_networks(self) -> Self {
        HttpTransport::builder().allow_private_networks(true).build().expect("the default settings are valid")
    }
}

/// Builds an [`HttpTransport`].
#[derive(Debug, Clone, Default)]
pub struct HttpTransportBuilder {
    allow_private: bool,
    roots: Vec<CertificateDer<'static>>,
    without_web_roots: bool,
}

impl HttpTransportBuilder {
    /// Connect to any address, not only public ones. Defaults to false.
    pub fn allow_private_networks(mut self, allow: bool) -> Self {
        self.allow_private = allow;
        self
    }

    /// Also trust this root certificate (DER), beside the built-in web roots.
    pub fn add_root_certificate_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.roots.push(CertificateDer::from(der.into()));
        self
    }

    /// Also trust every certificate in this PEM text (`-----BEGIN CERTIFICATE-----` blocks).
    /// [`TransportError::Config`] when it holds none, or one that does not parse.
    pub fn add_root_certificate_pem(mut self, pem: &[u8]) -> Result<Self, TransportError> {
        let before = self.roots.len();
        for cert in CertificateDer::pem_slice_iter(pem) {
            self.roots.push(cert.map_err(|e| TransportError::Config(format!("root certificate PEM: {e}")))?);
        }
        if self.roots.len() == before {
            return Err(TransportError::Config("no CERTIFICATE block in the root certificate PEM".into()));
        }
        Ok(self)
    }

    /// Trust only the added roots, not the built-in web roots (an endpoint fleet behind a private
    /// CA). Defaults to trusting both.
    pub fn without_web_roots(mut self) -> Self {
        self.without_web_roots = true;
        self
    }

    /// The transport; [`TransportError::Config`] when an added root is not a usable certificate.
    pub fn build(self) -> Result<HttpTransport, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        if !self.without_web_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for cert in &self.roots {
            roots.add(cert.clone()).map_err(|e| TransportError::Config(format!("root certificate: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new_with_resolver(PublicOnly {
            inner: GaiResolver::new(),
            allow_private: self.allow_private,
        });
        http.set_connect_timeout(Some(DEFAULT_CONNECT_TIMEOUT));
        http.set_nodelay(true);
        // https:// URLs are handed to the TLS layer over this connector's (checked) connection.
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(DEFAULT_POOL_IDLE_TIMEOUT).build(connector);
        Ok(HttpTransport { client, allow_private: self.allow_private, extra_roots: self.roots.len() })
    }
}

/// The error of a host name that resolves to no public address.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to no public address ({addresses}); HttpTransport::allow_private_networks allows it")]
struct NotPublic {
    host: String,
    addresses: String,
}

/// A resolver that drops the non-public addresses of a name, and fails when none is left.
#[derive(Clone)]
struct PublicOnly {
    inner: GaiResolver,
    allow_private: bool,
}

impl tower_service::Service<Name> for PublicOnly {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        let lookup = self.inner.call(name);
        Box::pin(async move {
            let all: Vec<SocketAddr> = lookup.await?.collect();
            let public: Vec<SocketAddr> =
                all.iter().copied().filter(|a| allow_private || is_public_address(a.ip())).collect();
            if public.is_empty() && !all.is_empty() {
                let addresses = all.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                return Err(Box::new(NotPublic { host, addresses }) as Self::Error);
            }
            Ok(public.into_iter())
        })
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn send(&self, request: WebhookRequest) -> Result<WebhookResponse, TransportError> {
        let unusable = |reason: String| TransportError::Unusable { url: request.url.clone(), reason };
        let uri: http::Uri = request.url.parse().map_err(|e| unusable(format!("invalid URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(unusable("HttpTransport sends http:// and https:// only".into()));
        }
        if !self.allow_private {
            // An IP literal is connected to without a lookup, so it is checked here.
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = host.parse::<IpAddr>() {
                if !is_public_address(ip) {
                    return Err(unusable(format!(
                        "{ip} is not a public address; HttpTransport::allow_private_networks allows it"
                    )));
                }
            }
        }
        let mut builder = http::Request::post(uri);
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let req = builder.body(Full::new(request.body.clone())).map_err(|e| unusable(e.to_string()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| match not_public(&e) {
                Some(reason) => TransportError::Unusable { url: request.url.clone(), reason },
                None => TransportError::Failed(error_chain(&e)),
            })?;
            let status = resp.status().as_u16();
            let retry_after =
                resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            // Read (a bounded amount of) the body so the connection can be reused.
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BODY).collect().await.map(|b| b.to_bytes());
            let excerpt = match &body {
                Ok(b) => String::from_utf8_lossy(&b[..b.len().min(RESPONSE_EXCERPT)]).into_owned(),
                // Over MAX_RESPONSE_BODY, or cut off: say so rather than record an empty body.
                Err(e) => format!("(body not read: {e})"),
            };
            Ok(WebhookResponse { status, retry_after, body_excerpt: excerpt })
        };
        tokio::time::timeout(request.timeout, exchange).await.map_err(|_| TransportError::Timeout(request.timeout))?
    }

    fn endpoint_policy(&self) -> EndpointPolicy {
        EndpointPolicy::default().allow_private_networks(self.allow_private)
    }
}

/// The [`NotPublic`] refusal somewhere in `e`'s chain of causes, as text.
fn not_public(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(refused) = err.downcast_ref::<NotPublic>() {
            return Some(refused.to_string());
        }
        next = err.source();
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn only_public_addresses_are_public() {
        for blocked in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
            "fec0::1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a00:1::1",
        ] {
            assert!(!is_public_address(blocked.parse().unwrap()), "{blocked} must not count as public");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.1.1",
            "198.20.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public_address(public.parse().unwrap()), "{public} is public");
        }
    }

    /// A local HTTP server answering 204 to every request; returns its port and a request count.
    fn local_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
            }
        });
        (port, hits)
    }

    fn request(url: String) -> WebhookRequest {
        WebhookRequest { url, headers: vec![], body: Bytes::from_static(b"{}"), timeout: Duration::from_secs(5) }
    }

    #[tokio::test]
    async fn private_endpoints_are_refused_for_good_unless_allowed() {
        let (port, hits) = local_server();
        let transport = HttpTransport::new();
        // By IP literal, IPv4 and IPv6, and by a name that resolves to loopback only.
        for url in [
            format!("http://127.0.0.1:{port}/hook"),
            format!("http://[::1]:{port}/hook"),
            format!("http://[::ffff:127.0.0.1]:{port}/hook"),
            format!("http://localhost:{port}/hook"),
            // Other spellings of 127.0.0.1 go through the resolver, and are filtered there.
            format!("http://2130706433:{port}/hook"),
            format!("http://127.1:{port}/hook"),
            format!("http://0x7f.1:{port}/hook"),
        ] {
            let err = transport.send(request(url.clone())).await.unwrap_err();
            assert!(err.is_permanent(), "{url}: {err}");
            let text = err.to_string();
            assert!(text.contains("public address") && text.contains("allow_private_networks"), "{url}: {text}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "no request reached the server");

        let allowed = HttpTransport::new().allow_private_networks();
        for url in [format!("http://127.0.0.1:{port}/hook"), format!("http://localhost:{port}/hook")] {
            let resp = allowed.send(request(url.clone())).await.unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(resp.status, 204, "{url}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
