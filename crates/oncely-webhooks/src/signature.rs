//! Standard Webhooks signatures: signing for senders, verification for receivers.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the signature is
//! `v1,` and the base64 of its HMAC-SHA256 under the secret's key. During a secret rotation the
//! sender puts several signatures in one header, separated by spaces; a receiver accepts the
//! message when any of them verifies under its secret, and when the timestamp is within its
//! tolerance of the receiver's clock (five minutes by default), which bounds replays.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use oncely_core::webhook::WebhookSecret;
use sha2::Sha256;

/// The header carrying the message id, the same on every attempt.
pub const HEADER_ID: &str = "webhook-id";
/// The header carrying the attempt's Unix timestamp, in seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Defaults to 5 minutes: how far a timestamp may be from the receiver's clock.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &WebhookSecret, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.key()).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// One signature: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
///
/// # Example
///
/// ```
/// use oncely_core::webhook::WebhookSecret;
/// use oncely_webhooks::signature::{sign, verify_at};
///
/// let secret = WebhookSecret::generate();
/// let sig = sign(&secret, "msg_1", 1_700_000_000, br#"{"a":1}"#);
/// assert!(sig.starts_with("v1,"));
/// assert!(verify_at(&secret, "msg_1", "1700000000", &sig, br#"{"a":1}"#, 1_700_000_010, std::time::Duration::from_secs(300)).is_ok());
/// ```
pub fn sign(secret: &WebhookSecret, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, msg_id, timestamp, body).finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// The `webhook-signature` header value: one signature per secret, space-separated.
pub fn signature_header(secrets: &[&WebhookSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// Why a message did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A required header is absent or not text.
    #[error("missing or unreadable header `{0}`")]
    MissingHeader(&'static str),
    /// The timestamp is not an integer.
    #[error("webhook-timestamp is not a Unix timestamp")]
    InvalidTimestamp,
    /// The timestamp is too far from now (a replay, or a badly wrong clock).
    #[error("webhook-timestamp is {0} s away from now, past the tolerance")]
    TimestampOutOfTolerance(i64),
    /// No `v1` signature in the header matches.
    #[error("no signature matches")]
    NoMatchingSignature,
}

/// A message that verified: what a receiver deduplicates on, and when it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `webhook-id`: the same on every attempt, so the key to deduplicate on.
    pub message_id: String,
    /// The attempt's `webhook-timestamp`, Unix seconds.
    pub timestamp: i64,
}

/// Verify a message with the receiver's clock. See [`verify_at`].
pub fn verify(
    secret: &WebhookSecret,
    msg_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    tolerance: Duration,
) -> Result<Verified, VerifyError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    verify_at(secret, msg_id, timestamp, signatures, body, now, tolerance)
}

/// Verify a message as of `now` (Unix seconds): the timestamp is within `tolerance` of `now`, and
/// one of the space-separated `v1,` signatures matches (compared in constant time). Signatures of
/// other versions are ignored.
pub fn verify_at(
    secret: &WebhookSecret,
    msg_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<Verified, VerifyError> {
    let ts: i64 = timestamp.trim().parse().map_err(|_| VerifyError::InvalidTimestamp)?;
    let skew = now.saturating_sub(ts);
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(VerifyError::TimestampOutOfTolerance(skew));
    }
    for candidate in signatures.split_whitespace() {
        let Some(b64) = candidate.strip_prefix("v1,") else { continue };
        let Ok(given) = base64::engine::general_purpose::STANDARD.decode(b64) else { continue };
        if mac(secret, msg_id, ts, body).verify_slice(&given).is_ok() {
            return Ok(Verified { message_id: msg_id.to_owned(), timestamp: ts });
        }
    }
    Err(VerifyError::NoMatchingSignature)
}

/// Verify a request's headers and body with the receiver's clock — the helper for oncely users who
/// receive webhooks. On success it returns the `webhook-id` to deduplicate on.
///
/// # Example
///
/// ```
/// use oncely_core::webhook::WebhookSecret;
/// use oncely_webhooks::signature::{sign, verify_headers, DEFAULT_TOLERANCE};
///
/// let secret = WebhookSecret::generate();
/// let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
/// let body = br#"{"type":"invoice.paid"}"#;
/// let mut headers = http::HeaderMap::new();
/// headers.insert("webhook-id", "msg_1".parse().unwrap());
/// headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
/// headers.insert("webhook-signature", sign(&secret, "msg_1", now, body).parse().unwrap());
/// let verified = verify_headers(&secret, &headers, body, DEFAULT_TOLERANCE).unwrap();
/// assert_eq!((verified.message_id.as_str(), verified.timestamp), ("msg_1", now));
/// assert!(verify_headers(&secret, &headers, b"tampered", DEFAULT_TOLERANCE).is_err());
/// ```
pub fn verify_headers(
    secret: &WebhookSecret,
    headers: &http::HeaderMap,
    body: &[u8],
    tolerance: Duration,
) -> Result<Verified, VerifyError> {
    let get =
        |name: &'static str| headers.get(name).and_then(|v| v.to_str().ok()).ok_or(VerifyError::MissingHeader(name));
    verify(secret, get(HEADER_ID)?, get(HEADER_TIMESTAMP)?, get(HEADER_SIGNATURE)?, body, tolerance)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference libraries.
    #[test]
    fn matches_the_specification_example() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn rejects_tampering_old_timestamps_and_other_secrets() {
        let secret = WebhookSecret::generate();
        let other = WebhookSecret::generate();
        let t = 1_700_000_000;
        let sig = sign(&secret, "msg_1", t, b"body");
        let tol = DEFAULT_TOLERANCE;
        assert_eq!(
            verify_at(&secret, "msg_1", "1700000000", &sig, b"body", t + 299, tol),
            Ok(Verified { message_id: "msg_1".into(), timestamp: t })
        );
        assert_eq!(
            verify_at(&secret, "msg_2", "1700000000", &sig, b"body", t, tol),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify_at(&secret, "msg_1", "1700000001", &sig, b"body", t, tol),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify_at(&other, "msg_1", "1700000000", &sig, b"body", t, tol),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verify_at(&secret, "msg_1", "1700000000", &sig, b"body", t + 301, tol),
            Err(VerifyError::TimestampOutOfTolerance(301))
        );
        assert_eq!(verify_at(&secret, "msg_1", "soon", &sig, b"body", t, tol), Err(VerifyError::InvalidTimestamp));
    }

    #[test]
    fn during_a_rotation_either_secret_verifies() {
        let (old, new) = (WebhookSecret::generate(), WebhookSecret::generate());
        let header = signature_header(&[&new, &old], "msg_1", 10, b"x");
        assert_eq!(header.split(' ').count(), 2);
        for s in [&old, &new] {
            assert!(verify_at(s, "msg_1", "10", &header, b"x", 10, DEFAULT_TOLERANCE).is_ok());
        }
        assert!(verify_at(&WebhookSecret::generate(), "msg_1", "10", &header, b"x", 10, DEFAULT_TOLERANCE).is_err());
        // Unknown versions and garbage are skipped, not fatal.
        let mixed = format!("v2,abc v1,!!! {header}");
        assert!(verify_at(&old, "msg_1", "10", &mixed, b"x", 10, DEFAULT_TOLERANCE).is_ok());
    }
}
