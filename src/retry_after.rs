//! `Retry-After` as Graph and Proofpoint send it, read defensively: delta-seconds (integer
//! or, leniently, fractional) or an HTTP-date, clamped to [`MAX`]. An answer can name any
//! number; whatever it says, no wait is longer than [`MAX`] and no arithmetic on it can
//! overflow (a `Retry-After: 99999999999999999999` once panicked a worker mid-message).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The longest wait an answer can impose. Longer requests are cut to it (with the queue's
/// retry tiers, a message is re-read at least this often while a service throttles).
pub const MAX: Duration = Duration::from_secs(600);

/// The wait `raw` asks for, at most [`MAX`]; `None` when it is not a `Retry-After` value
/// (negative, not a number, not a date), so the caller falls back to its own backoff.
pub fn parse(raw: &str, now: DateTime<Utc>) -> Option<Duration> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is still "a very long time".
        let secs = raw.parse::<u64>().unwrap_or(u64::MAX);
        return Some(clamp(Duration::from_secs(secs.min(MAX.as_secs()))));
    }
    if let Ok(secs) = raw.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        return Some(clamp(Duration::from_secs_f64(secs.min(MAX.as_secs_f64()))));
    }
    let at = DateTime::parse_from_rfc2822(raw).ok()?.with_timezone(&Utc);
    let wait = at
        .signed_duration_since(now)
        .to_std()
        .unwrap_or(Duration::ZERO);
    Some(clamp(wait))
}

fn clamp(d: Duration) -> Duration {
    d.min(MAX)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn seconds_fractions_and_dates() {
        let now = Utc::now();
        assert_eq!(parse("12", now), Some(Duration::from_secs(12)));
        assert_eq!(parse(" 1.5 ", now), Some(Duration::from_millis(1500)));
        let date = (now + TimeDelta::seconds(30))
            .to_rfc2822()
            .replace("+0000", "GMT");
        let d = parse(&date, now).unwrap();
        assert!(d <= Duration::from_secs(30) && d >= Duration::from_secs(28));
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::ZERO)
        );
        for junk in ["soon", "-3", "", "NaN", "inf", "-0.5", "1e"] {
            assert_eq!(parse(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn extreme_values_are_clamped() {
        let now = Utc::now();
        for huge in [
            "601",
            "18446744073709551615",
            "99999999999999999999999999999999",
            "1e300",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            assert_eq!(parse(huge, now), Some(MAX), "{huge}");
        }
    }

    proptest! {
        /// Whatever the header says, the wait is at most MAX and adding it to now works.
        #[test]
        fn any_value_is_bounded(raw in ".{0,40}", secs in any::<u64>(), f in any::<f64>()) {
            let now = Utc::now();
            for v in [raw, secs.to_string(), f.to_string(), format!("{f:e}")] {
                if let Some(d) = parse(&v, now) {
                    prop_assert!(d <= MAX);
                    prop_assert!(std::time::Instant::now().checked_add(d).is_some());
                }
            }
        }
    }
}
