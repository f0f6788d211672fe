//! Tracing across the queue: the W3C `traceparent` stored with a job.
//!
//! A job carries the [W3C Trace Context](https://www.w3.org/TR/trace-context/) `traceparent` of the
//! span that enqueued it (`oncely.jobs.traceparent`, NULL when there is none). Set it by hand with
//! [`NewJob::traceparent`](crate::NewJob::traceparent), or let the enqueue capture it: with the
//! cargo feature `otel`, [`enqueue`](crate::enqueue) and [`enqueue_many`](crate::enqueue_many)
//! take the current span's OpenTelemetry context through `tracing-opentelemetry` when the job has
//! none. The worker puts it on the job's span (field `traceparent`) and, with `otel`, makes that
//! span a child of, and linked to, the enqueuing span. Without the feature no OpenTelemetry crate
//! is compiled.
//!
//! A malformed value is refused, never stored: [`TraceParent::parse`] returns
//! [`Error::InvalidInput`], `oncely.enqueue(..., traceparent => ...)` raises SQLSTATE `22023`, and a
//! check constraint on the column refuses anything else. See `docs/operations.md`, "Tracing across
//! the queue".

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const LEN: usize = 55;

/// A valid W3C `traceparent` header value, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
///
/// # Example
///
/// ```
/// use oncely_core::trace::TraceParent;
///
/// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
/// assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(tp.parent_id(), "00f067aa0ba902b7");
/// assert!(tp.sampled());
/// assert!("not a traceparent".parse::<TraceParent>().is_err());
/// # Ok::<(), oncely_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceParent(String);

/// The message of a refused `traceparent` (the SQL API raises the same text).
pub(crate) const MALFORMED: &str =
    "traceparent must be a W3C trace context `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` \
     (lowercase, ids not all zero, version not ff)";

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceParent {
    /// Parse a `traceparent` header value by the W3C rules: lowercase hex, a version other than
    /// `ff`, a trace id and a parent id that are not all zeros. A version-00 value must be exactly
    /// 55 characters; a later version may carry more fields after a `-`, which are dropped (they
    /// are not understood by this version of the format).
    ///
    /// Malformed input is [`Error::InvalidInput`].
    pub fn parse(value: &str) -> Result<Self> {
        if !value.is_ascii() {
            return Err(Error::InvalidInput(MALFORMED.into()));
        }
        let head = match value.len() {
            LEN => value,
            n if n > LEN && !value.starts_with("00") && value.as_bytes()[LEN] == b'-' => &value[..LEN],
            _ => return Err(Error::InvalidInput(MALFORMED.into())),
        };
        let b = head.as_bytes();
        let well_formed = b[2] == b'-'
            && b[35] == b'-'
            && b[52] == b'-'
            && is_lower_hex(&head[0..2])
            && is_lower_hex(&head[3..35])
            && is_lower_hex(&head[36..52])
            && is_lower_hex(&head[53..55])
            && &head[0..2] != "ff"
            && head[3..35].bytes().any(|c| c != b'0')
            && head[36..52].bytes().any(|c| c != b'0');
        if !well_formed {
            return Err(Error::InvalidInput(MALFORMED.into()));
        }
        Ok(Self(head.to_owned()))
    }

    /// The header value, 55 characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    /// The parent id (the enqueuing span's id): 16 lowercase hex digits.
    pub fn parent_id(&self) -> &str {
        &self.0[36..52]
    }

    /// The trace flags byte.
    pub fn flags(&self) -> u8 {
        u8::from_str_radix(&self.0[53..55], 16).expect("a parsed traceparent's flags are two hex digits")
    }

    /// True when the enqueuing side sampled the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags() & 1 == 1
    }

    /// A stored value: the column's check constraint admits only what [`TraceParent::parse`]
    /// admits, so a failure here means the row was written around it; it is logged and dropped.
    pub(crate) fn from_column(value: Option<String>) -> Option<Self> {
        let value = value?;
        match Self::parse(&value) {
            Ok(tp) => Some(tp),
            Err(_) => {
                tracing::warn!(traceparent = %value, "ignoring a malformed traceparent stored with a job");
                None
            }
        }
    }
}

impl FromStr for TraceParent {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;

    impl TraceParent {
        /// The `traceparent` of the current `tracing` span's OpenTelemetry context (feature
        /// `otel`): `None` unless a `tracing-opentelemetry` layer is installed and the span (or
        /// an ancestor, or a parent set from a remote context) has a valid span context.
        pub fn from_current_span() -> Option<Self> {
            let cx = tracing::Span::current().context();
            let span = cx.span();
            Self::from_span_context(span.span_context())
        }

        /// The `traceparent` of an OpenTelemetry span context (feature `otel`); `None` when it is
        /// not valid.
        pub fn from_span_context(sc: &SpanContext) -> Option<Self> {
            if !sc.is_valid() {
                return None;
            }
            Some(Self(format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())))
        }

        /// This value as a remote OpenTelemetry span context (feature `otel`), to parent or link
        /// a span to. `tracestate` is not stored, so it is empty.
        pub fn to_span_context(&self) -> SpanContext {
            let trace_id = TraceId::from_hex(self.trace_id()).expect("a parsed trace id is 32 hex digits");
            let span_id = SpanId::from_hex(self.parent_id()).expect("a parsed parent id is 16 hex digits");
            SpanContext::new(trace_id, span_id, TraceFlags::new(self.flags()), true, TraceState::default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_version_00_value() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(tp.as_str(), GOOD);
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id(), "00f067aa0ba902b7");
        assert_eq!(tp.flags(), 1);
        assert!(tp.sampled());
        assert!(!TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled());
    }

    #[test]
    fn a_later_version_keeps_the_fields_it_understands() {
        let tp = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").unwrap();
        assert_eq!(tp.as_str(), "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "garbage",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero trace id, all-zero parent id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is invalid.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Version 00 with a trailing field, a short id, a wrong separator, non-hex.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            // A later version whose extra part does not start with a dash.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // Not ASCII (and a multi-byte character across the 55th byte).
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é-",
        ] {
            match TraceParent::parse(bad) {
                Err(Error::InvalidInput(m)) => assert_eq!(m, MALFORMED, "{bad}"),
                other => panic!("{bad:?} was not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_stored_value_is_dropped() {
        assert_eq!(TraceParent::from_column(Some("nope".into())), None);
        assert_eq!(TraceParent::from_column(None), None);
        assert_eq!(TraceParent::from_column(Some(GOOD.into())).unwrap().as_str(), GOOD);
    }
}
