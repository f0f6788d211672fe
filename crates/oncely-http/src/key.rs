//! The `Idempotency-Key` header: an sf-string (`"..."`) or a bare value of 1–255 printable ASCII
//! characters.

/// The longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Empty, after removing the quotes.
    #[error("the Idempotency-Key is empty")]
    Empty,
    /// Longer than [`MAX_KEY_LEN`].
    #[error("the Idempotency-Key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    /// A character outside printable ASCII, an unterminated or badly escaped string.
    #[error("the Idempotency-Key is not an sf-string or a token of printable ASCII characters")]
    Malformed,
    /// Sent more than once.
    #[error("more than one idempotency key was sent (the header repeated, or under two of its names)")]
    Repeated,
}

/// Parse the header value.
///
/// ```
/// use oncely_http::key::parse_key;
/// assert_eq!(parse_key(br#""8e03978e-40d5-43e8-bc93-6894a57f9324""#).unwrap(), "8e03978e-40d5-43e8-bc93-6894a57f9324");
/// assert_eq!(parse_key(b"order-42").unwrap(), "order-42");
/// assert!(parse_key(b"").is_err());
/// ```
pub fn parse_key(raw: &[u8]) -> Result<String, KeyError> {
    let raw = trim(raw);
    let key = if raw.first() == Some(&b'"') {
        parse_sf_string(raw)?
    } else {
        if raw.iter().any(|&b| !(0x21..=0x7e).contains(&b) || b == b'"') {
            return Err(KeyError::Malformed);
        }
        String::from_utf8(raw.to_vec()).map_err(|_| KeyError::Malformed)?
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(key)
}

fn trim(mut raw: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = raw {
        raw = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = raw {
        raw = rest;
    }
    raw
}

/// RFC 8941 sf-string: `"` chars `"`, with `\"` and `\\` escapes, printable ASCII only.
fn parse_sf_string(raw: &[u8]) -> Result<String, KeyError> {
    let mut out = String::new();
    let mut chars = raw[1..].iter();
    loop {
        match chars.next() {
            None => return Err(KeyError::Malformed),
            Some(b'"') => break,
            Some(b'\\') => match chars.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(c as char),
                _ => return Err(KeyError::Malformed),
            },
            Some(&c) if (0x20..=0x7e).contains(&c) => out.push(c as char),
            Some(_) => return Err(KeyError::Malformed),
        }
    }
    if chars.next().is_some() {
        return Err(KeyError::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sf_strings_and_bare_tokens() {
        assert_eq!(parse_key(br#""a b""#).unwrap(), "a b");
        assert_eq!(parse_key(br#""say \"hi\" \\o/""#).unwrap(), r#"say "hi" \o/"#);
        assert_eq!(parse_key(b"  key_1:x/y  ").unwrap(), "key_1:x/y");
        assert_eq!(parse_key("k".repeat(255).as_bytes()).unwrap().len(), 255);
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(parse_key(b""), Err(KeyError::Empty));
        assert_eq!(parse_key(br#""""#), Err(KeyError::Empty));
        assert_eq!(parse_key("k".repeat(256).as_bytes()), Err(KeyError::TooLong));
        for bad in
            [&b"a b"[..], b"\"unterminated", b"\"x\"y", b"caf\xc3\xa9", b"tab\there", b"\"bad \\escape\"", b"a\"b"]
        {
            assert_eq!(parse_key(bad), Err(KeyError::Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
