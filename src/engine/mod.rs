//! Runs a workflow: actions in order, the HTTP action attempt by attempt with
//! Flow's classification and retries, and the chain stopped at a failure.
//!
//! The engine prints nothing: it reports every attempt and action to a
//! [`Sink`] (the CLI's printer now, the durable store in `serve`).

pub mod clock;
pub mod http;
pub mod retry;
pub mod sign;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Map, Value, json};

pub use clock::{Clock, SystemClock};
pub use retry::{Next, RetryPolicy};

use crate::secrets::{Redactor, Secrets};
use crate::template;
use crate::workflow::{ActionKind, HttpAction, OnError, Workflow, model::human};
use http::{Class, Sent, Verdict};

/// Final state of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// 2XX/3XX, or a log line written.
    Succeeded,
    /// The chain stopped here.
    Failed,
    /// An error its policy said to ignore; the chain went on.
    Ignored,
    /// `when:` was false.
    Skipped,
    /// An earlier action failed.
    NotRun,
}

impl ActionStatus {
    /// The snake_case name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Succeeded => "succeeded",
            ActionStatus::Failed => "failed",
            ActionStatus::Ignored => "ignored",
            ActionStatus::Skipped => "skipped",
            ActionStatus::NotRun => "not_run",
        }
    }
}

/// Final state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// No action failed.
    Succeeded,
    /// An action failed; later ones did not run.
    Failed,
}

/// One HTTP attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct AttemptRecord {
    /// 1-based attempt number.
    pub attempt: u32,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// The status received, if any.
    pub http_status: Option<u16>,
    /// Why it did not succeed, if it did not.
    pub error: Option<String>,
    /// The start of the response body (secrets redacted).
    pub response_body: Option<String>,
    /// The delay before the next attempt, when one follows.
    pub retry_in_ms: Option<u64>,
    /// Outcome class: 2xx, 3xx, 4xx, 429, 5xx, timeout, connect_error, render_error.
    #[serde(default)]
    pub class: String,
}

/// What happened to one action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionReport {
    /// The action's `id`, if it has one.
    pub id: Option<String>,
    /// Its final status.
    pub status: ActionStatus,
    /// HTTP attempts made (0 for `log`, skipped and not-run actions).
    pub attempts: u32,
    /// The last status received.
    pub http_status: Option<u16>,
    /// Why it failed (or what was ignored), in one sentence.
    pub error: Option<String>,
    /// A `log` action's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// In a dry run, the request that would have been sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<http::Request>,
    /// Every attempt (not in the JSON summary; `-v` and the store show them).
    #[serde(skip)]
    pub attempt_log: Vec<AttemptRecord>,
}

/// What happened to a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Workflow name.
    pub workflow: String,
    /// Run id.
    pub run_id: String,
    /// Final status.
    pub status: RunStatus,
    /// Whether nothing was sent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Every action, in order.
    pub actions: Vec<ActionReport>,
}

/// Where the engine reports progress.
pub trait Sink: Send {
    /// An HTTP attempt finished.
    fn attempt(&mut self, action: usize, record: &AttemptRecord);
    /// An action reached its final status.
    fn action(&mut self, index: usize, report: &ActionReport);
}

/// A sink that drops everything.
#[derive(Debug, Default)]
pub struct NoSink;

impl Sink for NoSink {
    fn attempt(&mut self, _: usize, _: &AttemptRecord) {}
    fn action(&mut self, _: usize, _: &ActionReport) {}
}

/// What a run is started with.
#[derive(Debug, Clone)]
pub struct RunInput {
    /// The run's id.
    pub run_id: String,
    /// The trigger's JSON payload.
    pub payload: Value,
    /// The `trigger` variable: `{event|schedule, fired_at}`.
    pub trigger: Value,
    /// The secrets the workflow references.
    pub secrets: Secrets,
}

impl RunInput {
    /// The `trigger` variable for a workflow fired now.
    pub fn trigger_for(wf: &Workflow, fired_at: SystemTime) -> Value {
        let fired_at = humantime::format_rfc3339_millis(fired_at).to_string();
        match (&wf.trigger.event, &wf.trigger.schedule) {
            (Some(event), _) => json!({"event": event, "fired_at": fired_at}),
            (None, Some(schedule)) => json!({"schedule": schedule, "fired_at": fired_at}),
            (None, None) => json!({"fired_at": fired_at}),
        }
    }
}

/// A new time-ordered id (UUID v7).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Builds the template context for action `index`.
pub fn context(
    wf: &Workflow,
    input: &RunInput,
    steps: &Map<String, Value>,
    index: usize,
    attempt: u32,
    delivery_id: &str,
) -> Value {
    json!({
        "payload": input.payload,
        "trigger": input.trigger,
        "run": {"id": input.run_id, "workflow": wf.name},
        "action": {"id": wf.actions[index].id, "attempt": attempt, "delivery_id": delivery_id},
        "steps": steps,
        "secrets": input.secrets.to_json(),
    })
}

/// Which action, and which attempt of it, a step is.
#[derive(Debug, Clone, Copy)]
pub struct ActionAt<'a> {
    /// Index of the action in the workflow.
    pub index: usize,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Stable across this action's retries (and across restarts in `serve`).
    pub delivery_id: &'a str,
    /// When attempt 1 started: the retry window counts from it.
    pub first_started: SystemTime,
}

/// The result of [`Engine::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Stepped {
    /// The HTTP attempt made, if one was.
    pub record: Option<AttemptRecord>,
    /// What follows.
    pub step: Step,
    /// A `log` action's message.
    pub message: Option<String>,
    /// In a dry run, the rendered request.
    pub request: Option<http::Request>,
}

/// How one HTTP attempt ended, with what follows.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptOutcome {
    /// The attempt as recorded.
    pub record: AttemptRecord,
    /// What follows it.
    pub step: Step,
}

/// What follows an HTTP attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send again after this delay.
    Retry(Duration),
    /// The action is finished.
    Done {
        /// Final status.
        status: ActionStatus,
        /// Why, when not succeeded.
        error: Option<String>,
        /// The `steps.<id>` value for later actions (none when failed).
        result: Option<Value>,
    },
}

/// Sends workflows' HTTP requests; one per process, so connections are reused.
#[derive(Clone)]
pub struct Engine {
    client: reqwest::Client,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct Error(#[from] reqwest::Error);

impl Engine {
    /// An engine with its own client (redirects disabled) and the given clock.
    pub fn new(clock: Arc<dyn Clock>) -> Result<Self, Error> {
        // reqwest is built without a default TLS crypto provider; ring builds fastest here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // Flow: a 3XX is a success and is not followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("flowrun/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Engine { client, clock })
    }

    /// Runs every action of `wf` in order, in the foreground, sleeping between retries.
    pub async fn run(
        &self,
        wf: &Workflow,
        input: &RunInput,
        dry_run: bool,
        sink: &mut dyn Sink,
    ) -> RunReport {
        let redactor = input.secrets.redactor();
        let mut steps = Map::new();
        let mut actions = Vec::with_capacity(wf.actions.len());
        let mut failed = false;
        for (index, action) in wf.actions.iter().enumerate() {
            let report = if failed {
                blank(action.id.clone(), ActionStatus::NotRun)
            } else {
                let delivery_id = new_id();
                let (report, result) = self
                    .action(
                        wf,
                        input,
                        &steps,
                        index,
                        &delivery_id,
                        dry_run,
                        &redactor,
                        sink,
                    )
                    .await;
                if let (Some(id), Some(result)) = (&action.id, result) {
                    steps.insert(id.clone(), result);
                }
                report
            };
            failed |= report.status == ActionStatus::Failed;
            sink.action(index, &report);
            actions.push(report);
        }
        RunReport {
            workflow: wf.name.clone(),
            run_id: input.run_id.clone(),
            status: if failed {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            },
            dry_run,
            actions,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn action(
        &self,
        wf: &Workflow,
        input: &RunInput,
        steps: &Map<String, Value>,
        index: usize,
        delivery_id: &str,
        dry_run: bool,
        redactor: &Redactor,
        sink: &mut dyn Sink,
    ) -> (ActionReport, Option<Value>) {
        let mut report = blank(wf.actions[index].id.clone(), ActionStatus::Succeeded);
        let first_started = self.clock.now();
        let mut attempt = 1;
        loop {
            let at = ActionAt {
                index,
                attempt,
                delivery_id,
                first_started,
            };
            let out = self.step(wf, input, steps, &at, dry_run, redactor).await;
            report.message = out.message;
            if out.request.is_some() {
                // The dry run's placeholder response.
                report.http_status = Some(200);
            }
            report.request = out.request;
            if let Some(record) = out.record {
                sink.attempt(index, &record);
                report.attempts = attempt;
                report.http_status = record.http_status.or(report.http_status);
                report.attempt_log.push(record);
            }
            match out.step {
                Step::Retry(delay) => {
                    self.clock.sleep(delay).await;
                    attempt += 1;
                }
                Step::Done {
                    status,
                    error,
                    result,
                } => {
                    report.status = status;
                    report.error = error;
                    return (report, result);
                }
            }
        }
    }

    /// Advances action `at.index` by one step: evaluates `when`, writes a `log`,
    /// or makes one HTTP attempt (renders it only, in a dry run).
    ///
    /// Both the foreground run and `serve`'s workers drive actions through this.
    pub async fn step(
        &self,
        wf: &Workflow,
        input: &RunInput,
        steps: &Map<String, Value>,
        at: &ActionAt<'_>,
        dry_run: bool,
        redactor: &Redactor,
    ) -> Stepped {
        let action = &wf.actions[at.index];
        let ctx = context(wf, input, steps, at.index, at.attempt, at.delivery_id);
        let mut out = Stepped {
            record: None,
            step: Step::Done {
                status: ActionStatus::Succeeded,
                error: None,
                result: None,
            },
            message: None,
            request: None,
        };
        let failed = |error: String| Step::Done {
            status: ActionStatus::Failed,
            error: Some(redactor.redact(&error)),
            result: None,
        };
        match evaluate_when(action.when.as_deref(), &ctx) {
            Ok(true) => {}
            Ok(false) => {
                out.step = Step::Done {
                    status: ActionStatus::Skipped,
                    error: None,
                    result: Some(
                        json!({"outcome": "skipped", "status": null, "headers": {}, "body": "", "json": null}),
                    ),
                };
                return out;
            }
            Err(e) => {
                out.step = failed(e);
                return out;
            }
        }
        match action.kind() {
            ActionKind::Log(source) => match template::render(source, &ctx) {
                Ok(message) => {
                    let message = redactor.redact(&message);
                    tracing::info!(workflow = %wf.name, run = %input.run_id, "{message}");
                    out.step = Step::Done {
                        status: ActionStatus::Succeeded,
                        error: None,
                        result: Some(
                            json!({"outcome": "succeeded", "status": null, "headers": {}, "body": message, "json": null}),
                        ),
                    };
                    out.message = Some(message);
                }
                Err(e) => out.step = failed(format!("cannot render `log`: {e}")),
            },
            ActionKind::Http(h) if dry_run => {
                match http::render(h, &ctx, at.delivery_id, unix(self.clock.now())) {
                    Ok(mut req) => {
                        req.url = redactor.redact(&req.url);
                        req.body = redactor.redact(&req.body);
                        for (_, v) in &mut req.headers {
                            *v = redactor.redact(v);
                        }
                        out.request = Some(req);
                        // A dry run's placeholder: 200 with an empty body.
                        out.step = Step::Done {
                            status: ActionStatus::Succeeded,
                            error: None,
                            result: Some(
                                json!({"outcome": "succeeded", "status": 200, "headers": {}, "body": "", "json": null, "dry_run": true}),
                            ),
                        };
                    }
                    Err(e) => out.step = failed(e),
                }
            }
            ActionKind::Http(h) => {
                let attempted = self
                    .http_attempt(
                        h,
                        &ctx,
                        at.delivery_id,
                        at.attempt,
                        at.first_started,
                        redactor,
                    )
                    .await;
                out.record = Some(attempted.record);
                out.step = attempted.step;
            }
        }
        out
    }

    /// Makes one attempt of an HTTP action and decides what follows it.
    ///
    /// `first_started` is when attempt 1 started: the retry window counts from it.
    pub async fn http_attempt(
        &self,
        h: &HttpAction,
        ctx: &Value,
        delivery_id: &str,
        attempt: u32,
        first_started: SystemTime,
        redactor: &Redactor,
    ) -> AttemptOutcome {
        let started = self.clock.now();
        let mut record = AttemptRecord {
            attempt,
            started_at: humantime::format_rfc3339_millis(started).to_string(),
            duration_ms: 0,
            http_status: None,
            error: None,
            response_body: None,
            retry_in_ms: None,
            class: "render_error".to_owned(),
        };
        let req = match http::render(h, ctx, delivery_id, unix(started)) {
            Ok(r) => r,
            Err(e) => {
                // A request that cannot be rendered will not render on a retry either.
                let error = redactor.redact(&e);
                record.error = Some(error.clone());
                return AttemptOutcome {
                    record,
                    step: Step::Done {
                        status: ActionStatus::Failed,
                        error: Some(error),
                        result: None,
                    },
                };
            }
        };
        let sent = http::send(&self.client, &req, h.timeout).await;
        record.class = match &sent {
            Sent::Response(r) => match r.status {
                200..=299 => "2xx",
                300..=399 => "3xx",
                429 => "429",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "other",
            },
            Sent::Timeout(_) => "timeout",
            Sent::Connection(_) => "connect_error",
        }
        .to_owned();
        let now = self.clock.now();
        record.duration_ms = duration_ms(now.duration_since(started).unwrap_or_default());
        let elapsed = now.duration_since(first_started).unwrap_or_default();
        let policy = RetryPolicy::from(h.retry);

        let (reason, retry_after) = match &sent {
            Sent::Response(r) => {
                record.http_status = Some(r.status);
                // Redact before cutting, so a secret across the cut cannot leave a prefix behind.
                record.response_body = Some(preview(&redactor.redact(&r.body)));
                let line = r.status_line();
                match http::classify(r.status, h) {
                    Verdict::Success => {
                        return done(
                            record,
                            ActionStatus::Succeeded,
                            None,
                            Some(r.to_step("succeeded")),
                        );
                    }
                    Verdict::Policy(policy_choice, class) => {
                        let what = match class {
                            Class::Server => format!("{line} is a server error"),
                            Class::Client => format!("{line} is a client error"),
                        };
                        match policy_choice {
                            OnError::Fail => {
                                return done(record, ActionStatus::Failed, Some(what), None);
                            }
                            OnError::Ignore => {
                                let result = Some(r.to_step("ignored"));
                                return done(
                                    record,
                                    ActionStatus::Ignored,
                                    Some(format!("{what} (ignored)")),
                                    result,
                                );
                            }
                            OnError::Retry => {
                                // Retry-After is honoured on 429 and 503.
                                let ra = if matches!(r.status, 429 | 503) {
                                    r.retry_after(now)
                                } else {
                                    None
                                };
                                (r.status.to_string(), ra)
                            }
                        }
                    }
                }
            }
            Sent::Timeout(t) => (format!("no response within {}", human::format(*t)), None),
            Sent::Connection(e) => (redactor.redact(e), None),
        };
        record.error = Some(match &sent {
            Sent::Response(r) => format!("{} is retried", r.status_line()),
            _ => reason.clone(),
        });
        match policy.next(attempt, elapsed, retry_after, fastrand::f64()) {
            Next::RetryIn(delay) => {
                record.retry_in_ms = Some(duration_ms(delay));
                AttemptOutcome {
                    record,
                    step: Step::Retry(delay),
                }
            }
            Next::WindowExhausted => {
                let window = human::format(policy.max_duration);
                let error = if policy.max_duration.is_zero() {
                    format!("retries are off (max_duration 0s); last: {reason}")
                } else {
                    format!(
                        "retry window of {window} ran out after {attempt} {}; last: {reason}",
                        plural(attempt)
                    )
                };
                done(record, ActionStatus::Failed, Some(error), None)
            }
            Next::RetryAfterPastWindow(delay) => {
                let error = format!(
                    "Retry-After of {} points past the retry window of {}; last: {reason}",
                    human::format(delay),
                    human::format(policy.max_duration)
                );
                done(record, ActionStatus::Failed, Some(error), None)
            }
        }
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "attempt" } else { "attempts" }
}

fn done(
    mut record: AttemptRecord,
    status: ActionStatus,
    error: Option<String>,
    result: Option<Value>,
) -> AttemptOutcome {
    // The attempt's own error says how the action ended, when this attempt ended it.
    if error.is_some() {
        record.error.clone_from(&error);
    }
    AttemptOutcome {
        record,
        step: Step::Done {
            status,
            error,
            result,
        },
    }
}

/// Evaluates `when:`; no condition means run.
pub fn evaluate_when(when: Option<&str>, ctx: &Value) -> Result<bool, String> {
    match when {
        None => Ok(true),
        Some(expr) => {
            template::is_true(expr, ctx).map_err(|e| format!("cannot evaluate `when`: {e}"))
        }
    }
}

/// An action report with no attempts.
pub fn blank(id: Option<String>, status: ActionStatus) -> ActionReport {
    ActionReport {
        id,
        status,
        attempts: 0,
        http_status: None,
        error: None,
        message: None,
        request: None,
        attempt_log: Vec::new(),
    }
}

/// The first 4 KiB of a body, for attempt history.
fn preview(body: &str) -> String {
    const MAX: usize = 4096;
    if body.len() <= MAX {
        return body.to_owned();
    }
    let mut end = MAX;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &body[..end], body.len())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
