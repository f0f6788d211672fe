//! Durations on the command line: `30s`, `5m`, `24h`, `7d`, `250ms`.

use std::time::Duration;

/// Parse `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split =
        s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("`{s}` has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit `{unit}` in `{s}` (use ms, s, m, h or d)")),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(|| format!("`{s}` is too long"))
}

/// The inverse of [`parse`]: the largest unit that divides `d` exactly (`90s`, `24h`, `7d`).
pub(crate) fn format(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{d:?}");
    }
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    for (unit, secs) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s != 0 && s % secs == 0 {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(604_800)));
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        assert!(parse("7").unwrap_err().contains("no unit"));
        assert!(parse("7w").unwrap_err().contains("unknown unit"));
        assert!(parse("h").unwrap_err().contains("whole number"));
        assert!(parse("99999999999999999999d").is_err());
        assert!(parse("").is_err());
        assert!(parse("-5s").is_err());
        assert!(parse("5 s").is_err());
    }

    #[test]
    fn formats_back_in_the_largest_exact_unit() {
        for s in ["0s", "90s", "5m", "25h", "7d", "250ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
        assert_eq!(format(parse("24h").unwrap()), "1d");
        assert_eq!(format(Duration::from_micros(1500)), "1.5ms");
    }
}
