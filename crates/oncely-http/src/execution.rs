//! [`Execution`]: a response extension telling the layer whether the handler began executing the
//! request, and so whether its response may be stored.

/// Put in a response's extensions to tell the layer whether the request started executing.
///
/// A response to a request that never started executing — refused by validation before any effect
/// — must not be stored: the client corrects the request and retries with the same key, and that
/// retry has to run, not replay the refusal. The layer takes statuses in
/// [`IdempotencyConfig::rejected_statuses`](crate::IdempotencyConfig::rejected_statuses) (axum's
/// extractor rejections: 400, 405, 413, 415, 422) as not started; this extension overrides that
/// for one response:
///
/// - [`Execution::NotStarted`] on your own validation errors with other statuses (a 409 or 404
///   decided before any write): returned, never stored, the key freed.
/// - [`Execution::Started`] on a 400 or 422 answered after the handler made effects (a declined
///   charge that was recorded): stored and replayed like any answer.
///
/// With the `axum` feature it is a response part:
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::http::StatusCode;
/// use oncely_http::Execution;
/// let refusal = (StatusCode::CONFLICT, Execution::NotStarted, "order already shipped");
/// # let _ = axum::response::IntoResponse::into_response(refusal); }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// The handler refused the request before executing it: do not store the response.
    NotStarted,
    /// The handler executed the request: store the response under the usual rules, whatever its
    /// status.
    Started,
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponseParts for Execution {
    type Error = std::convert::Infallible;
    fn into_response_parts(
        self,
        mut res: axum_core::response::ResponseParts,
    ) -> Result<axum_core::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}
