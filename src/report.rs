//! Prints a run's result: one line per action (each attempt at `-v`), or one JSON object.

use std::fmt::Write as _;

use crate::engine::{ActionReport, AttemptRecord, RunReport, RunStatus};

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON (see docs/cli.md).
    Json,
}

/// The run as one JSON object.
pub fn json(report: &RunReport) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| panic!("BUG: a report serializes: {e}"))
}

/// One line for an attempt (used live at `-v`).
pub fn attempt_line(label: &str, a: &AttemptRecord) -> String {
    let status = a
        .http_status
        .map_or_else(|| "---".to_owned(), |s| s.to_string());
    let mut line = format!(
        "  {label} attempt {}: {status} in {}ms",
        a.attempt, a.duration_ms
    );
    if let Some(e) = &a.error {
        let _ = write!(line, ": {e}");
    }
    if let Some(ms) = a.retry_in_ms {
        let _ = write!(line, "; retrying in {ms}ms");
    }
    line
}

/// The run as text: a header, one line per action, and in a dry run each request.
pub fn text(report: &RunReport, verbose: bool) -> String {
    let status = match report.status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
    };
    let mut out = format!("run {} of `{}`: {status}\n", report.run_id, report.workflow);
    let width = report
        .actions
        .iter()
        .enumerate()
        .map(|(i, a)| label(i, a).len())
        .max()
        .unwrap_or(0);
    for (i, a) in report.actions.iter().enumerate() {
        let label = label(i, a);
        let _ = write!(out, "  {label:width$}  {:9}", a.status.as_str());
        if a.attempts > 0 {
            let noun = if a.attempts == 1 {
                "attempt"
            } else {
                "attempts"
            };
            let _ = write!(out, "  {} {noun}", a.attempts);
        }
        if let Some(s) = a.http_status {
            let _ = write!(out, "  HTTP {s}");
        }
        if let Some(m) = &a.message {
            let _ = write!(out, "  {m}");
        }
        if let Some(e) = &a.error {
            let _ = write!(out, "  {e}");
        }
        out.push('\n');
        if verbose {
            for attempt in &a.attempt_log {
                out.push_str(&attempt_line(&label, attempt));
                out.push('\n');
            }
        }
        if let Some(req) = &a.request {
            let _ = writeln!(out, "    {} {}", req.method, req.url);
            for (name, value) in &req.headers {
                let _ = writeln!(out, "    {name}: {value}");
            }
            if !req.body.is_empty() {
                let _ = writeln!(out, "\n    {}", req.body.replace('\n', "\n    "));
            }
        }
    }
    if report.dry_run {
        out.push_str("dry run: nothing was sent; each HTTP action's `steps.<id>` held a placeholder 200 response with an empty body\n");
    }
    out
}

fn label(index: usize, a: &ActionReport) -> String {
    a.id.clone().unwrap_or_else(|| format!("#{}", index + 1))
}
