//! Timestamps for the wire and human-friendly durations for flags and config.

use std::time::{Duration, SystemTime};

/// `google.protobuf.Timestamp` for a moment.
pub fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

/// `google.protobuf.Timestamp` for now.
pub fn now() -> prost_types::Timestamp {
    timestamp(SystemTime::now())
}

/// Longest interval, timeout or drain a request may ask for.
pub const MAX_REQUEST_SECONDS: i32 = 3600;

/// A request's seconds field: 0 for `default`, else 1 to [`MAX_REQUEST_SECONDS`].
pub fn seconds_field(field: &str, value: i32, default: Duration) -> Result<Duration, String> {
    match value {
        0 => Ok(default),
        1..=MAX_REQUEST_SECONDS => Ok(Duration::from_secs(value as u64)),
        _ => Err(format!(
            "{field} must be from 0 (default) to {MAX_REQUEST_SECONDS} (got {value})"
        )),
    }
}

/// A request's optional time range must not end before it starts.
pub fn check_range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<(), String> {
    match (start, end) {
        (Some(s), Some(e)) if (s.seconds, s.nanos) > (e.seconds, e.nanos) => {
            Err("start_time is after end_time".into())
        }
        _ => Ok(()),
    }
}

/// Parses `250ms`, `30s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write e.g. 500ms, 30s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }
}
