//! [`IdempotencyLayer`] and its service [`Idempotency`].

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

use crate::config::{IdempotencyConfig, InFlight, MissingKey, MAX_RETRY_AFTER};
use crate::execution::Execution;
use crate::key::{parse_key, KeyError};
use crate::problem::Problem;
use crate::store::{IdempotencyStore, StoreClaim, StoredResponse};
use crate::tx::{CommitError, RequestTx, Taken, TxMode};

/// The header carrying the key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set to `true` on replayed responses.
pub const IDEMPOTENCY_REPLAYED: &str = "idempotency-replayed";
/// The request id header: on every response that passes the layer, and in problem documents.
pub const REQUEST_ID: &str = "x-request-id";
/// The longest client `x-request-id` the layer echoes (visible ASCII only); a longer or otherwise
/// unfit one is replaced by a new UUID, in the request the handler sees and in the response.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// How often a waiting duplicate checks whether the first request finished.
const WAIT_POLL: Duration = Duration::from_millis(20);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body the inner service receives: the original (passed through) or the buffered one.
pub type InnerBody<B> = Either<B, Full<Bytes>>;
/// The body of the layer's responses: the inner service's, or a stored, replayed or problem body.
pub type ResponseBody<B> = Either<B, Full<Bytes>>;

#[derive(Clone)]
pub(crate) enum Mode {
    Store(Arc<dyn IdempotencyStore>),
    Transactional(TxMode),
}

/// Adds `Idempotency-Key` handling to a service.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use oncely_http::{IdempotencyConfig, IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_config(IdempotencyConfig {
///     ttl: Duration::from_secs(3600),
///     ..IdempotencyConfig::default()
/// });
/// // axum: Router::new().route("/usage", post(record_usage)).layer(layer)
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    mode: Mode,
    config: Arc<IdempotencyConfig>,
    estimate: Arc<Estimate>,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A moving average of how long the layer's handlers take, for `Retry-After`.
#[derive(Debug, Default)]
struct Estimate {
    /// Microseconds; 0 before the first observation.
    micros: AtomicU64,
}

impl Estimate {
    fn observe(&self, d: Duration) {
        let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        // An exponentially weighted average (1/8 per sample); a lost race loses one sample.
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
        self.micros.store(new.max(1), Ordering::Relaxed);
    }

    /// How long a duplicate is told to wait: the estimate, at least 1 s (the header's unit), at
    /// most [`MAX_RETRY_AFTER`] and `lease_left`.
    fn retry_after(&self, lease_left: Duration) -> Duration {
        let est = Duration::from_micros(self.micros.load(Ordering::Relaxed));
        est.min(MAX_RETRY_AFTER).min(lease_left).max(Duration::from_secs(1))
    }
}

impl IdempotencyLayer {
    /// Keep responses in `store`.
    pub fn new(store: impl IdempotencyStore) -> Self {
        IdempotencyLayer {
            mode: Mode::Store(Arc::new(store)),
            config: Arc::new(IdempotencyConfig::default()),
            estimate: Arc::default(),
        }
    }

    /// Transactional mode: each request with a key runs in one PostgreSQL transaction that the
    /// handler uses for its own writes (through [`RequestTx`]) and in which the layer stores the
    /// response, so the effect and the stored response commit together. Concurrent duplicates wait
    /// for the first and replay it. A 5xx rolls the whole transaction back.
    pub fn transactional(pool: sqlx::PgPool) -> Self {
        IdempotencyLayer {
            mode: Mode::Transactional(TxMode { pool }),
            config: Arc::new(IdempotencyConfig::default()),
            estimate: Arc::default(),
        }
    }

    /// Use `config`.
    pub fn with_config(mut self, mut config: IdempotencyConfig) -> Self {
        // Each key header name once, even if listed twice (else every request would carry "two" keys).
        let mut names = Vec::with_capacity(config.key_headers.len());
        for name in config.key_headers.drain(..) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        config.key_headers = names;
        self.config = Arc::new(config);
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency { inner, mode: self.mode.clone(), config: self.config.clone(), estimate: self.estimate.clone() }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    mode: Mode,
    config: Arc<IdempotencyConfig>,
    estimate: Arc<Estimate>,
}

impl<S> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("config", &self.config).finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for Idempotency<S>
where
    S: Service<Request<InnerBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let run = Run {
            inner,
            mode: self.mode.clone(),
            config: self.config.clone(),
            estimate: self.estimate.clone(),
            _bodies: std::marker::PhantomData,
        };
        Box::pin(run.handle_with_request_id(req))
    }
}

struct Run<S, B, ResBody> {
    inner: S,
    mode: Mode,
    config: Arc<IdempotencyConfig>,
    estimate: Arc<Estimate>,
    _bodies: std::marker::PhantomData<fn() -> (B, ResBody)>,
}

fn problem<B>(
    p: Problem,
    status: StatusCode,
    detail: &str,
    request_id: &str,
    code: Option<&str>,
) -> Response<ResponseBody<B>> {
    p.response(status, detail, request_id, code).map(Either::Right)
}

fn replay<B>(stored: &StoredResponse, request_id: &str) -> Response<ResponseBody<B>> {
    metrics::counter!("oncely_idempotency_replays_total").increment(1);
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(stored.body.clone()))));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (header::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            resp.headers_mut().append(n, v);
        }
    }
    resp.headers_mut().insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// The request id the layer uses: the client's `x-request-id` if it is one value of 1 to
/// [`MAX_REQUEST_ID_LEN`] visible ASCII characters, else a new UUID. For layers outside this one
/// (authentication, a request-id layer) that want the same rule.
///
/// ```
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-request-id", "req-1".parse().unwrap());
/// assert_eq!(oncely_http::request_id(&headers), "req-1");
/// headers.insert("x-request-id", "x".repeat(200).parse().unwrap());
/// assert_ne!(oncely_http::request_id(&headers).len(), 200);
/// ```
pub fn request_id(headers: &http::HeaderMap) -> String {
    let mut values = headers.get_all(REQUEST_ID).iter();
    match (values.next(), values.next()) {
        (Some(v), None)
            if (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
                && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b)) =>
        {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

fn retry_after<B>(mut resp: Response<ResponseBody<B>>, d: Duration) -> Response<ResponseBody<B>> {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

/// SHA-256 of method, route (the request's path and query, after the configured route name if
/// any) and body.
pub fn fingerprint(method: &http::Method, route: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b"\n");
    h.update(route.as_bytes());
    h.update(b"\n");
    h.update(body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl<S, B, ResBody> Run<S, B, ResBody>
where
    S: Service<Request<InnerBody<B>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// [`handle`](Self::handle) with the request id settled first: the handler sees it in the
    /// request, and every response carries it, a first 2xx as much as a problem or a replay.
    async fn handle_with_request_id(self, mut req: Request<B>) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let request_id = request_id(req.headers());
        let value = HeaderValue::from_str(&request_id).expect("request ids are visible ASCII");
        req.headers_mut().insert(REQUEST_ID, value.clone());
        let mut resp = self.handle(req, &request_id).await?;
        resp.headers_mut().entry(REQUEST_ID).or_insert(value);
        Ok(resp)
    }

    async fn handle(mut self, req: Request<B>, request_id: &str) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let cfg = self.config.clone();
        if !cfg.methods.contains(req.method()) {
            return self.pass(req.map(Either::Left)).await;
        }
        let request_id = request_id.to_owned();
        let parsed = {
            let mut values = cfg.key_headers.iter().flat_map(|name| req.headers().get_all(name).iter());
            match (values.next(), values.next()) {
                (None, _) => None,
                (Some(_), Some(_)) => Some(Err(KeyError::Repeated)),
                (Some(v), None) => Some(parse_key(v.as_bytes())),
            }
        };
        let (key, generated) = match parsed {
            Some(Ok(k)) => (k, false),
            Some(Err(e)) => {
                return Ok(problem(Problem::KeyMalformed, StatusCode::BAD_REQUEST, &e.to_string(), &request_id, None));
            }
            None => match cfg.missing_key {
                MissingKey::PassThrough => return self.pass(req.map(Either::Left)).await,
                MissingKey::Require => {
                    let detail = "this endpoint requires an Idempotency-Key header";
                    return Ok(problem(Problem::KeyMissing, StatusCode::BAD_REQUEST, detail, &request_id, None));
                }
                MissingKey::Generate => (uuid::Uuid::new_v4().to_string(), true),
            },
        };

        // Buffer the body under the limit; above it nothing is stored.
        let (parts, body) = req.into_parts();
        let too_large = || {
            let detail = format!("the request body is larger than {} bytes", cfg.max_body_bytes);
            problem(Problem::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE, &detail, &request_id, None)
        };
        let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > cfg.max_body_bytes) {
            return Ok(too_large());
        }
        let body = match Limited::new(body, cfg.max_body_bytes).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Ok(too_large()),
            Err(e) => {
                let detail = format!("the request body could not be read: {e}");
                return Ok(problem(Problem::BodyUnreadable, StatusCode::BAD_REQUEST, &detail, &request_id, None));
            }
        };
        // The path and the query string: the same key sent with `?units=5` and then `?units=50` is
        // a different request, not a replay.
        let target = parts.uri.path_and_query().map_or_else(|| parts.uri.path(), |pq| pq.as_str());
        let route = match &cfg.route {
            Some(name) => format!("{name} {target}"),
            None => target.to_owned(),
        };
        let fp = fingerprint(&parts.method, &route, &body);
        let scope = (cfg.scope)(&parts);
        let req = Request::from_parts(parts, Either::Right(Full::new(body)));
        tracing::debug!(idempotency.key = %key, scope = %scope, %request_id, "idempotent request");

        let mut resp = match self.mode.clone() {
            Mode::Store(store) => self.with_store(store, req, &scope, &key, &fp, &request_id).await?,
            Mode::Transactional(tx) => self.with_tx(tx, req, &scope, &key, &fp, &request_id).await?,
        };
        if generated {
            if let Ok(v) = HeaderValue::from_str(&key) {
                let name = cfg.key_headers.first().cloned().unwrap_or(http::HeaderName::from_static(IDEMPOTENCY_KEY));
                resp.headers_mut().insert(name, v);
            }
        }
        Ok(resp)
    }

    async fn pass(&mut self, req: Request<InnerBody<B>>) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        Ok(self.inner.call(req).await?.map(Either::Left))
    }

    fn conflict(&self, request_id: &str) -> Response<ResponseBody<ResBody>> {
        let detail = "this Idempotency-Key was already used with a different request (method, route or body)";
        metrics::counter!("oncely_idempotency_conflicts_total").increment(1);
        // The code is the same whatever the status, so clients can switch on it.
        problem(Problem::KeyReused, self.config.conflict_status, detail, request_id, Some("idempotency_conflict"))
    }

    /// 409 for a duplicate of a request in progress; `lease_left` is the time left on its lease.
    fn busy(&self, lease_left: Duration, request_id: &str) -> Response<ResponseBody<ResBody>> {
        let detail = "a request with this Idempotency-Key is still being processed; retry later";
        metrics::counter!("oncely_idempotency_in_flight_rejections_total").increment(1);
        let wait = self.estimate.retry_after(lease_left);
        retry_after(problem(Problem::InProgress, StatusCode::CONFLICT, detail, request_id, None), wait)
    }

    /// A 500 for a failure of the handler that the layer caught. Not a store failure.
    fn handler_failed(&self, detail: &str, request_id: &str) -> Response<ResponseBody<ResBody>> {
        problem(Problem::HandlerFailed, StatusCode::INTERNAL_SERVER_ERROR, detail, request_id, None)
    }

    fn unavailable(&self, e: &dyn std::fmt::Display, request_id: &str) -> Response<ResponseBody<ResBody>> {
        tracing::error!(error = %e, %request_id, "idempotency store unavailable; refusing the request");
        let detail = "the request was not processed; retry with the same Idempotency-Key";
        retry_after(
            problem(Problem::StoreUnavailable, StatusCode::SERVICE_UNAVAILABLE, detail, request_id, None),
            Duration::from_secs(1),
        )
    }

    /// Run the handler (a panic becomes a 500), call the `before_store` hook, and buffer the
    /// response. Returns the response head, its body, and whether the handler failed.
    async fn run_buffered(
        &mut self,
        req: Request<InnerBody<B>>,
        request_id: &str,
    ) -> Result<(http::response::Parts, Bytes, bool), S::Error> {
        let failure = |p: Problem, detail: &str| {
            let (parts, body) = p.parts(StatusCode::INTERNAL_SERVER_ERROR, detail, request_id, None);
            (parts, body, true)
        };
        let started = Instant::now();
        let out = match AssertUnwindSafe(self.inner.call(req)).catch_unwind().await {
            Ok(Ok(resp)) => {
                let (parts, body) = resp.into_parts();
                match body.collect().await {
                    Ok(c) => (parts, c.to_bytes(), false),
                    Err(e) => {
                        let e: BoxError = e.into();
                        tracing::error!(error = %e, "the handler's response body failed");
                        failure(Problem::HandlerFailed, "the response could not be produced")
                    }
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::error!(%request_id, "the handler panicked; releasing the idempotency key");
                failure(Problem::HandlerPanicked, "internal error")
            }
        };
        self.estimate.observe(started.elapsed());
        if let Some(hook) = &self.config.before_store {
            hook().await;
        }
        Ok(out)
    }

    /// Whether to store this response: not a failure, not a 5xx (unless configured), never
    /// 401/403/429, and only if the request started executing (see [`Execution`]).
    fn storable(&self, parts: &http::response::Parts, failed: bool) -> bool {
        let status = parts.status;
        let started = match parts.extensions.get::<Execution>() {
            Some(Execution::Started) => true,
            Some(Execution::NotStarted) => false,
            None => !self.config.rejected_statuses.contains(&status),
        };
        !failed
            && started
            && (!status.is_server_error() || self.config.store_server_errors)
            && !matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS)
    }

    fn to_stored(&self, parts: &http::response::Parts, body: &Bytes) -> StoredResponse {
        let headers = self
            .config
            .stored_headers
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(move |v| Some((name.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            })
            .collect();
        StoredResponse { status: parts.status.as_u16(), headers, body: body.to_vec() }
    }

    async fn with_store(
        &mut self,
        store: Arc<dyn IdempotencyStore>,
        req: Request<InnerBody<B>>,
        scope: &str,
        key: &str,
        fp: &str,
        request_id: &str,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let cfg = self.config.clone();
        let deadline = match cfg.in_flight {
            InFlight::Wait(max) => Some(Instant::now() + max),
            InFlight::Reject => None,
        };
        let token = loop {
            match store.claim(scope, key, fp, cfg.lease, cfg.ttl).await {
                Ok(StoreClaim::Run { token }) => break token,
                Ok(StoreClaim::Replay(stored)) => return Ok(replay(&stored, request_id)),
                Ok(StoreClaim::Mismatch) => return Ok(self.conflict(request_id)),
                Ok(StoreClaim::Busy { retry_after }) => match deadline {
                    Some(d) if Instant::now() < d => tokio::time::sleep(WAIT_POLL).await,
                    _ => return Ok(self.busy(retry_after, request_id)),
                },
                Err(e) => return Ok(self.unavailable(&e, request_id)),
            }
        };
        // If this future is dropped from here on (the client went away, the process died), the key
        // stays in progress until its lease ends: the handler may have made its effects. While the
        // handler runs, a heartbeat extends the lease, so a slow handler is never run twice.
        let heartbeat = async {
            let mut tick = tokio::time::interval((cfg.lease / 3).max(Duration::from_millis(10)));
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = store.extend(scope, key, token, cfg.lease).await {
                    tracing::warn!(error = %e, %request_id, "could not extend the idempotency key's lease");
                }
            }
        };
        let (parts, body, failed) = tokio::select! {
            out = self.run_buffered(req, request_id) => out?,
            () = heartbeat => unreachable!("the heartbeat loop never ends"),
        };
        if self.storable(&parts, failed) {
            let stored = self.to_stored(&parts, &body);
            if let Err(e) = store.complete(scope, key, token, &stored, cfg.ttl).await {
                // The handler ran; its response goes out. The key frees when its lease ends, and a
                // retry after that runs again: use transactional mode to close this window.
                tracing::error!(error = %e, %request_id, "could not store the response");
            }
        } else if let Err(e) = store.release(scope, key, token).await {
            tracing::warn!(error = %e, "could not release the idempotency key; it frees when its lease ends");
        }
        Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
    }

    async fn with_tx(
        &mut self,
        mode: TxMode,
        mut req: Request<InnerBody<B>>,
        scope: &str,
        key: &str,
        fp: &str,
        request_id: &str,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let cfg = self.config.clone();
        let lock_wait = match cfg.in_flight {
            InFlight::Reject => crate::tx::TX_REJECT_LOCK_WAIT,
            InFlight::Wait(max) => max,
        };
        let (tx, claimed) = match mode.begin_and_claim(scope, key, fp, cfg.lease, cfg.ttl, lock_wait).await {
            Ok(v) => v,
            Err(e) => return Ok(self.unavailable(&e, request_id)),
        };
        let token = match claimed {
            StoreClaim::Run { token } => token,
            other => {
                drop(tx);
                return Ok(match other {
                    StoreClaim::Replay(stored) => replay(&stored, request_id),
                    StoreClaim::Mismatch => self.conflict(request_id),
                    StoreClaim::Busy { retry_after } => self.busy(retry_after, request_id),
                    StoreClaim::Run { .. } => unreachable!("handled above"),
                });
            }
        };
        let handle = RequestTx::new(tx);
        req.extensions_mut().insert(handle.clone());
        let (parts, body, failed) = self.run_buffered(req, request_id).await?;
        let tx = match handle.take() {
            Taken::Tx(tx) => tx,
            Taken::InUse => {
                // A handler bug, not a store failure: work it spawned outlived it. The transaction
                // (with the key's claim) rolls back when that work drops it.
                tracing::error!(%request_id, "the request transaction was still in use when the handler returned; nothing was committed");
                return Ok(self
                    .handler_failed("the request was not processed; retry with the same Idempotency-Key", request_id));
            }
        };
        if !self.storable(&parts, failed) {
            // Roll back the handler's writes with the claim: the retry starts from scratch.
            let _ = tx.rollback().await;
            return Ok(Response::from_parts(parts, Either::Right(Full::new(body))));
        }
        let stored = self.to_stored(&parts, &body);
        match mode.complete_and_commit(tx, scope, key, token, &stored, cfg.ttl).await {
            Ok(()) => {}
            Err(CommitError::Store(e)) => return Ok(self.unavailable(&e, request_id)),
            Err(CommitError::HandlerAborted) if parts.status.is_client_error() => {
                // The handler refused the request after one of its statements failed: its answer
                // stands, nothing was written or stored, and a retry runs again.
                tracing::debug!(%request_id, status = %parts.status, "the handler's transaction failed; its refusal is not stored");
            }
            Err(CommitError::HandlerAborted) => {
                tracing::error!(%request_id, status = %parts.status, "the handler answered success after a statement of its transaction failed; nothing was committed");
                return Ok(self
                    .handler_failed("the request was not processed; retry with the same Idempotency-Key", request_id));
            }
        }
        Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_follows_observed_durations_within_one_second_and_the_cap() {
        let e = Estimate::default();
        let lease = Duration::from_secs(60);
        assert_eq!(e.retry_after(lease), Duration::from_secs(1), "nothing observed yet");
        e.observe(Duration::from_millis(50));
        assert_eq!(e.retry_after(lease), Duration::from_secs(1), "a 50 ms request: 1 s, not the lease");
        let slow = Estimate::default();
        slow.observe(Duration::from_millis(2500));
        assert_eq!(slow.retry_after(lease), Duration::from_millis(2500));
        assert_eq!(slow.retry_after(Duration::from_secs(2)), Duration::from_secs(2), "never past the lease");
        let stuck = Estimate::default();
        stuck.observe(Duration::from_secs(600));
        assert_eq!(stuck.retry_after(lease), MAX_RETRY_AFTER);
        // An average: one slow request among quick ones moves it by an eighth.
        e.observe(Duration::from_secs(8));
        assert!(e.retry_after(lease) < Duration::from_secs(2));
    }
}
