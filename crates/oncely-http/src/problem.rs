//! Errors as `application/problem+json` (RFC 9457), with a stable `type` and the request id.
//! Database error text never reaches the client.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The problems this layer answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// 400: the key is malformed.
    KeyMalformed,
    /// 400: the route requires a key and none was sent.
    KeyMissing,
    /// 413: the body is over the limit; nothing was stored.
    BodyTooLarge,
    /// 400: the body could not be read (the client went away mid-body, a broken encoding).
    BodyUnreadable,
    /// 422 (or 409): the key was used with a different request.
    KeyReused,
    /// 409: a request with this key is still being processed.
    InProgress,
    /// 503: the idempotency store could not be reached; the request did not run.
    StoreUnavailable,
    /// 500: the handler panicked; the key was released.
    HandlerPanicked,
    /// 500: the handler failed in a way the layer caught: its response body errored, its writes
    /// in the request transaction failed while it answered success, or work it spawned still held
    /// the request transaction when it returned. Nothing was stored or committed; the key is free
    /// for a retry. Never used for a store failure ([`StoreUnavailable`](Self::StoreUnavailable)).
    HandlerFailed,
}

impl Problem {
    fn slug(self) -> &'static str {
        match self {
            Problem::KeyMalformed => "idempotency-key-malformed",
            Problem::KeyMissing => "idempotency-key-missing",
            Problem::BodyTooLarge => "body-too-large",
            Problem::BodyUnreadable => "body-unreadable",
            Problem::KeyReused => "idempotency-key-reused",
            Problem::InProgress => "idempotency-key-in-progress",
            Problem::StoreUnavailable => "idempotency-store-unavailable",
            Problem::HandlerPanicked => "internal-error",
            Problem::HandlerFailed => "handler-failed",
        }
    }

    /// The `type` URI.
    pub fn type_uri(self) -> String {
        format!("urn:oncely:problem:{}", self.slug())
    }

    fn title(self) -> &'static str {
        match self {
            Problem::KeyMalformed => "Malformed Idempotency-Key",
            Problem::KeyMissing => "Idempotency-Key required",
            Problem::BodyTooLarge => "Request body too large",
            Problem::BodyUnreadable => "Request body could not be read",
            Problem::KeyReused => "Idempotency-Key reused with a different request",
            Problem::InProgress => "A request with this Idempotency-Key is in progress",
            Problem::StoreUnavailable => "Idempotency store unavailable",
            Problem::HandlerPanicked => "Internal error",
            Problem::HandlerFailed => "The request failed in its handler",
        }
    }

    /// The response: `status`, a problem document with `detail` and `request_id`, and a
    /// machine-readable `code` for clients that switch on it (e.g. `idempotency_conflict`).
    pub(crate) fn response(
        self,
        status: StatusCode,
        detail: &str,
        request_id: &str,
        code: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = self.parts(status, detail, request_id, code);
        Response::from_parts(parts, Full::new(body))
    }

    /// [`response`](Self::response) as a head and a body.
    pub(crate) fn parts(
        self,
        status: StatusCode,
        detail: &str,
        request_id: &str,
        code: Option<&str>,
    ) -> (http::response::Parts, Bytes) {
        let mut doc = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": detail,
            "request_id": request_id,
        });
        if let Some(code) = code {
            doc["code"] = code.into();
        }
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            parts.headers.insert("x-request-id", v);
        }
        (parts, Bytes::from(doc.to_string()))
    }
}
