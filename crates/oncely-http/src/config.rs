//! Per-route settings of the layer, with their defaults as named constants.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderName, Method, StatusCode};
use sha2::{Digest, Sha256};

/// Defaults to 24 hours: how long a response is kept for replay.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Defaults to 1 MiB: the largest request body the layer buffers; above it the answer is 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Defaults to 60 s: how long a request in progress holds its key. A process that dies mid-request
/// blocks its key no longer than this.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Defaults to 10 s: the most a duplicate of a request in progress is told to wait
/// (`Retry-After`). The value sent is the layer's estimate of how long its requests take (a moving
/// average of the durations it observed, rounded up to whole seconds), at least 1 s and at most this
/// and the time left on the first request's lease.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Defaults to 400, 405, 413, 415 and 422: the statuses axum's routing and extractors answer when
/// they reject a request before its handler runs (bad JSON, a wrong `Content-Type`, a body over an
/// extractor's limit, a method the route lacks). See [`IdempotencyConfig::rejected_statuses`].
pub const DEFAULT_REJECTED_STATUSES: [StatusCode; 5] = [
    StatusCode::BAD_REQUEST,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::UNSUPPORTED_MEDIA_TYPE,
    StatusCode::UNPROCESSABLE_ENTITY,
];

/// The authenticated caller, as the service's authentication layer found it. Put it in the request
/// extensions (in a layer outside the idempotency layer) and the default scope uses it: keys are
/// then kept per principal, whatever credential or header spelling the caller sent.
///
/// ```
/// # let mut req = http::Request::new(());
/// // In your authentication middleware, after checking the credential:
/// req.extensions_mut().insert(oncely_http::Principal("account:42".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(pub String);

/// What to do with a request that has no `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Run it without idempotency. The default.
    #[default]
    PassThrough,
    /// Refuse it with 400.
    Require,
    /// Make a UUID key, use it, and return it in the `Idempotency-Key` response header.
    Generate,
}

/// What to do when the key's first request is still running.
///
/// In transactional mode the first request holds its key in its open transaction, so a duplicate
/// waits on it in the database: under `Reject` for at most
/// [`TX_REJECT_LOCK_WAIT`](crate::TX_REJECT_LOCK_WAIT) (one that is about to commit is replayed),
/// under `Wait(d)` for at most `d`; then 409. Either way it holds a pool connection meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InFlight {
    /// Answer 409 with `Retry-After`. The default.
    #[default]
    Reject,
    /// Wait up to this long for the first request to finish and replay its response; 409 after.
    Wait(Duration),
}

/// Derives the caller scope of a request: keys are separate per scope, so no caller can ever be
/// replayed another's response.
pub type ScopeFn = Arc<dyn Fn(&http::request::Parts) -> String + Send + Sync>;

/// Called after the handler returns and before its response is stored (for crash tests).
pub type BeforeStore = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Settings of one [`IdempotencyLayer`](crate::IdempotencyLayer). Use one layer per route group
/// to give routes different TTLs or policies.
#[derive(Clone)]
pub struct IdempotencyConfig {
    /// Methods that take part. Defaults to POST and PATCH; others pass through.
    pub methods: Vec<Method>,
    /// The request headers that carry the key, in order of preference: `Idempotency-Key` by
    /// default. Add `x-idempotency-key` (say) to keep clients that send the older name working;
    /// a request carrying more than one key value is refused (400). A generated key is sent back
    /// under the first name.
    pub key_headers: Vec<http::HeaderName>,
    /// Missing-key policy. Defaults to [`MissingKey::PassThrough`].
    pub missing_key: MissingKey,
    /// Replay window. Defaults to [`DEFAULT_TTL`].
    pub ttl: Duration,
    /// Body limit. Defaults to [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Status for a key reused with a different request: 422 (the IETF draft) by default; 409 for
    /// APIs that promised it (the problem then carries `code: idempotency_conflict`).
    pub conflict_status: StatusCode,
    /// In-flight policy. Defaults to [`InFlight::Reject`].
    pub in_flight: InFlight,
    /// Store 5xx responses too. Defaults to false: a 5xx (or a panic) releases the key so a retry
    /// runs again.
    pub store_server_errors: bool,
    /// Statuses taken to mean "rejected before the handler ran": such a response is returned but
    /// not stored (and in transactional mode rolled back), so the corrected retry with the same key
    /// runs. Defaults to [`DEFAULT_REJECTED_STATUSES`], which covers axum's extractor rejections.
    /// A response carrying [`Execution`](crate::Execution) in its extensions overrides the status:
    /// `Execution::NotStarted` is never stored, `Execution::Started` is stored like any answer.
    pub rejected_statuses: Vec<StatusCode>,
    /// Lease of a request in progress. Defaults to [`DEFAULT_LEASE`].
    pub lease: Duration,
    /// The caller scope. Defaults to [`default_scope`]: the [`Principal`] your authentication layer
    /// put in the request extensions, else a hash of the credential headers, else the client
    /// address. Keys are separate per scope, and shared by every route and layer of that scope
    /// that uses the same store.
    pub scope: ScopeFn,
    /// Response headers kept for replay. Defaults to content-type, location, etag.
    pub stored_headers: Vec<HeaderName>,
    /// A name for the route, added to the fingerprint before the request's path and query string
    /// (which are always in it). None by default.
    pub route: Option<String>,
    #[doc(hidden)]
    pub before_store: Option<BeforeStore>,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            methods: vec![Method::POST, Method::PATCH],
            key_headers: vec![http::HeaderName::from_static(crate::IDEMPOTENCY_KEY)],
            missing_key: MissingKey::default(),
            ttl: DEFAULT_TTL,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            conflict_status: StatusCode::UNPROCESSABLE_ENTITY,
            in_flight: InFlight::default(),
            store_server_errors: false,
            rejected_statuses: DEFAULT_REJECTED_STATUSES.to_vec(),
            lease: DEFAULT_LEASE,
            scope: Arc::new(default_scope),
            stored_headers: vec![http::header::CONTENT_TYPE, http::header::LOCATION, http::header::ETAG],
            route: None,
            before_store: None,
        }
    }
}

impl std::fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("methods", &self.methods)
            .field("missing_key", &self.missing_key)
            .field("ttl", &self.ttl)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("conflict_status", &self.conflict_status)
            .field("in_flight", &self.in_flight)
            .field("store_server_errors", &self.store_server_errors)
            .field("rejected_statuses", &self.rejected_statuses)
            .field("lease", &self.lease)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// A client address a server can put in request extensions for the default scope to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);

fn digest(kind: &str, v: &[u8]) -> String {
    let d = Sha256::digest(v);
    let hex: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{kind}:{hex}")
}

/// The default scope, first found of:
///
/// 1. the [`Principal`] an authentication layer put in the request extensions — the scope to
///    use: one caller is one scope whatever credential it sent;
/// 2. a hash of the `x-api-key` header;
/// 3. a hash of `Authorization`, its scheme compared case-insensitively and runs of spaces
///    folded (`Bearer T`, `bearer T` and `Bearer  T` are one scope);
/// 4. the client address — a [`ClientAddr`] in the request extensions, or (with the `axum`
///    feature) axum's `ConnectInfo<SocketAddr>`, present when the server runs with
///    `into_make_service_with_connect_info`;
/// 5. `anonymous`.
///
/// The limits of 2 and 3: they hash the credential, not the caller. A caller whose token is
/// refreshed between two retries (OAuth access tokens, rotated API keys), or who holds two keys,
/// is two scopes, and its retry runs the request again. Put a [`Principal`] in the extensions
/// wherever a caller can have more than one credential.
///
/// Behind a reverse proxy every client has the proxy's address: put the real one in a
/// [`ClientAddr`] (from a header your proxy sets), or configure a scope. Callers with no identity
/// at all share the `anonymous` scope: give public endpoints a scope of their own.
pub fn default_scope(parts: &http::request::Parts) -> String {
    if let Some(Principal(id)) = parts.extensions.get::<Principal>() {
        return digest("principal", id.as_bytes());
    }
    if let Some(v) = parts.headers.get("x-api-key") {
        return digest("key", v.as_bytes());
    }
    if let Some(v) = parts.headers.get(http::header::AUTHORIZATION) {
        return digest("auth", &normalize_authorization(v.as_bytes()));
    }
    if let Some(ClientAddr(ip)) = parts.extensions.get::<ClientAddr>() {
        return format!("ip:{ip}");
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
    {
        return format!("ip:{}", addr.ip());
    }
    "anonymous".into()
}

/// `Authorization` with its scheme lowercased (schemes are case-insensitive) and the spaces around
/// and between its parts folded to one; the credential itself is kept byte for byte.
fn normalize_authorization(raw: &[u8]) -> Vec<u8> {
    let mut parts = raw.split(|b| *b == b' ' || *b == b'\t').filter(|p| !p.is_empty());
    let mut out = parts.next().map(<[u8]>::to_ascii_lowercase).unwrap_or_default();
    for p in parts {
        out.push(b' ');
        out.extend_from_slice(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_of(headers: &[(&str, &str)], principal: Option<&str>) -> String {
        let mut b = http::Request::post("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b.body(()).unwrap();
        if let Some(p) = principal {
            req.extensions_mut().insert(Principal(p.into()));
        }
        default_scope(&req.into_parts().0)
    }

    #[test]
    fn authorization_spellings_of_one_credential_are_one_scope_and_a_principal_wins() {
        let a = scope_of(&[("authorization", "Bearer T")], None);
        assert_eq!(a, scope_of(&[("authorization", "bearer T")], None));
        assert_eq!(a, scope_of(&[("authorization", " Bearer   T ")], None));
        assert_ne!(a, scope_of(&[("authorization", "Bearer t")], None), "the credential is case-sensitive");
        let p = scope_of(&[("authorization", "Bearer T")], Some("acct-1"));
        assert_eq!(p, scope_of(&[("authorization", "Bearer U"), ("x-api-key", "k")], Some("acct-1")));
        assert_ne!(p, scope_of(&[], Some("acct-2")));
    }
}
