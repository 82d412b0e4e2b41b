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
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("`{expr}` is not a valid cron schedule: {e}"))
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
    }
}
