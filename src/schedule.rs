//! Cron schedules: five fields, evaluated in UTC.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Parses a five-field cron expression (minute hour day-of-month month day-of-week).
pub fn parse(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 && !expr.trim_start().starts_with('@') {
        return Err(format!(
            "`{expr}` has {fields} fields; a schedule has 5 (minute hour day-of-month month day-of-week), in UTC"
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("`{expr}` is not a valid cron schedule: {e}"))?;
    // A date that never exists (`0 0 30 2 *`) parses but would never fire.
    const Y2000: i64 = 946_684_800_000;
    if next_tick(&cron, Y2000).is_none() {
        return Err(format!("`{expr}` never fires (no such date)"));
    }
    Ok(cron)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_fields_parse_and_others_are_refused() {
        assert!(parse("*/5 * * * *").is_ok());
        assert!(parse("@daily").is_ok());
        assert!(
            parse("61 * * * *")
                .expect_err("minute 61")
                .contains("not a valid cron")
        );
        assert!(
            parse("0 0 * * * *")
                .expect_err("six fields")
                .contains("has 6 fields")
        );
        assert!(
            parse("0 0 30 2 *")
                .expect_err("30 February")
                .contains("never fires")
        );
        assert!(parse("0 0 29 2 *").is_ok(), "leap days exist");
    }
}

/// The first tick of `cron` strictly after `after` (ms since the epoch, UTC).
pub fn next_tick(cron: &Cron, after: i64) -> Option<i64> {
    let start = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(after)?;
    cron.find_next_occurrence(&start, false)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// How many ticks of `cron` fall in `(after, until]`, counting at most `cap`.
pub fn ticks_between(cron: &Cron, after: i64, until: i64, cap: usize) -> usize {
    let mut n = 0;
    let mut t = after;
    while n < cap {
        match next_tick(cron, t) {
            Some(next) if next <= until => {
                n += 1;
                t = next;
            }
            _ => break,
        }
    }
    n
}

#[cfg(test)]
mod tick_tests {
    use super::*;

    #[test]
    fn next_tick_is_strictly_after_and_in_utc() {
        let cron = parse("*/5 * * * *").expect("valid");
        // 2026-01-01T00:00:00Z
        let t0 = 1_767_225_600_000;
        assert_eq!(next_tick(&cron, t0), Some(t0 + 5 * 60_000));
        assert_eq!(next_tick(&cron, t0 - 1), Some(t0));
        assert_eq!(ticks_between(&cron, t0, t0 + 60 * 60_000, 100), 12);
        assert_eq!(ticks_between(&cron, t0, t0 + 60 * 60_000, 3), 3);
    }
}
