//! Durable runs, attempts and due work.
//!
//! A [`Store`] keeps accepted events, each run's position (next action,
//! attempt, delivery id, earlier results), every attempt, and when the run is
//! next due. Workers claim due runs under a lease, make one attempt, and record
//! the attempt together with the run's next state in one transaction.

pub mod postgres;
pub mod sqlite;

use std::future::Future;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::engine::{ActionReport, AttemptRecord};

/// Milliseconds since the Unix epoch: the store's time unit.
pub type Millis = i64;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused an operation.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused an operation.
    #[error("database error: {0}")]
    Postgres(String),
    /// The database URL is not understood.
    #[error("unsupported database URL `{0}`; use sqlite://PATH or postgres://…")]
    Url(String),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A transaction could not be committed.
    #[error("cannot commit: {0}")]
    Commit(String),
    /// The database is owned by another process.
    #[error("{0}")]
    Locked(String),
    /// The run's claim was taken over (the lease ended): this worker must stop.
    #[error("the claim on this run was taken over by another worker")]
    LostClaim,
    /// Too many writes are waiting; try again shortly.
    #[error("the store is overloaded; try again shortly")]
    Busy,
    /// The store's writer has stopped.
    #[error("the store is closed")]
    Closed,
}

/// Module-local result.
pub type Result<T = ()> = std::result::Result<T, Error>;

/// A workflow version a run is pinned to.
#[derive(Debug, Clone)]
pub struct Version {
    /// Hex SHA-256 of `source`.
    pub hash: String,
    /// Workflow name.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// The file's text.
    pub source: String,
}

/// A run to create with an event.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Run id.
    pub id: String,
    /// The pinned workflow version.
    pub version: Version,
    /// The `trigger` template variable.
    pub trigger: Value,
    /// Delivery id for the first action.
    pub delivery_id: String,
}

/// An accepted event with the runs it starts.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Event id.
    pub id: String,
    /// Event name (or `schedule:<workflow>` for a cron tick).
    pub name: String,
    /// The JSON payload.
    pub payload: Value,
    /// When it was accepted.
    pub received_at: Millis,
    /// One run per matching workflow.
    pub runs: Vec<NewRun>,
    /// For a schedule: `(workflow, tick)`, stored once; a second ingest of the same tick stores nothing.
    pub tick: Option<(String, Millis)>,
}

/// A run a worker has claimed: everything needed to take its next step.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Run id.
    pub id: String,
    /// Pinned version hash (its text: [`Store::version`]).
    pub version_hash: String,
    /// The payload.
    pub payload: Value,
    /// The `trigger` variable.
    pub trigger: Value,
    /// Index of the action to run.
    pub next_action: usize,
    /// Attempt number to make.
    pub attempt: u32,
    /// Delivery id of the current action.
    pub delivery_id: String,
    /// When the current action's first attempt started.
    pub first_attempt_at: Option<Millis>,
    /// Earlier actions' results (`steps`).
    pub steps: Map<String, Value>,
}

/// Where a run goes after a step.
#[derive(Debug, Clone, PartialEq)]
pub enum NextState {
    /// Retry the same action at `due_at` (released, pending).
    Retry {
        /// Attempt number of the retry.
        attempt: u32,
        /// When it is due.
        due_at: Millis,
        /// When the action's first attempt started.
        first_attempt_at: Millis,
    },
    /// Go on to the next action now.
    Advance {
        /// Its index.
        next_action: usize,
        /// Its delivery id.
        delivery_id: String,
        /// The steps so far.
        steps: Map<String, Value>,
    },
    /// The run is over.
    Finished {
        /// `succeeded` or `failed`.
        status: &'static str,
        /// Actions that will not run (indices and ids), marked `not_run`.
        not_run: Vec<(usize, Option<String>)>,
    },
}

/// One step's results, recorded in one transaction.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// Run id.
    pub run_id: String,
    /// The action's index.
    pub action: usize,
    /// The HTTP attempt made, if any.
    pub attempt: Option<AttemptRecord>,
    /// The action's final report, when it finished.
    pub report: Option<ActionReport>,
    /// The run's next state.
    pub next: NextState,
    /// Now.
    pub at: Millis,
    /// When going on to the next action, the claim is held until then.
    pub lease_until: Millis,
    /// The worker that holds the claim: a record from a worker that lost it is refused.
    pub worker: String,
}

/// Filters for listing runs.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RunFilter {
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only this status (`pending`, `succeeded`, `failed`).
    pub status: Option<String>,
    /// At most this many (default 50, at most 1000).
    pub limit: Option<u32>,
    /// Only runs created before this run id (for paging, newest first).
    pub before: Option<String>,
}

/// A run in a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Run id.
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// The event that started it.
    pub event_id: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    /// When it was accepted (RFC 3339).
    pub created_at: String,
    /// When it finished (RFC 3339).
    pub finished_at: Option<String>,
    /// When it is next due, while pending (RFC 3339).
    pub due_at: Option<String>,
}

/// An action in a run's detail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionDetail {
    /// Index in the workflow.
    pub index: usize,
    /// The action's id.
    pub id: Option<String>,
    /// Status (`pending` until it finishes).
    pub status: String,
    /// Attempts made.
    pub attempts: u32,
    /// Last status received.
    pub http_status: Option<u16>,
    /// Why it failed.
    pub error: Option<String>,
    /// A log action's message.
    pub message: Option<String>,
    /// Every attempt.
    pub attempt_log: Vec<AttemptRecord>,
}

/// A run with its actions and attempts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunDetail {
    /// The summary fields.
    #[serde(flatten)]
    pub summary: RunSummary,
    /// The pinned workflow version (hash).
    pub version: String,
    /// The file the version came from.
    pub file: String,
    /// The payload.
    pub payload: Value,
    /// Every action of the pinned version.
    pub actions: Vec<ActionDetail>,
}

/// Durable storage for `serve`. Implemented for SQLite; PostgreSQL shares the trait.
pub trait Store: Send + Sync + 'static {
    /// Stores an event and its runs; returns once they are durable (committed, fsync'd).
    /// Returns `false` (and stores nothing) when the event's schedule tick was already fired.
    fn ingest(&self, event: NewEvent) -> impl Future<Output = Result<bool>> + Send;
    /// The latest tick fired for each schedule workflow.
    fn last_ticks(&self) -> impl Future<Output = Result<Vec<(String, Millis)>>> + Send;
    /// Runs not finished, and of those the ones waiting for a retry.
    fn queue_depth(&self) -> impl Future<Output = Result<(u64, u64)>> + Send;
    /// Claims up to `limit` runs due at `now`, leasing them to `worker` until `lease_until`.
    fn claim(
        &self,
        worker: &str,
        now: Millis,
        lease_until: Millis,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Claimed>>> + Send;
    /// Records one step and the run's next state; a retry or finish releases the claim.
    fn record(&self, step: StepRecord) -> impl Future<Output = Result> + Send;
    /// Extends `worker`'s claim on a run to `until`; `false` if the claim was lost.
    fn renew(
        &self,
        run_id: &str,
        worker: &str,
        until: Millis,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Gives `worker`'s claims back (at shutdown).
    fn release(&self, worker: &str) -> impl Future<Output = Result<u64>> + Send;
    /// At start-up: makes work held by processes that died claimable again, and
    /// says how much there was. SQLite (one process per file): every claim.
    /// PostgreSQL (shared): claims whose lease has ended.
    fn recover(&self, now: Millis) -> impl Future<Output = Result<u64>> + Send;
    /// A pinned workflow version's file name and text.
    fn version(&self, hash: &str) -> impl Future<Output = Result<Option<(String, String)>>> + Send;
    /// When the earliest pending run is due, if any.
    fn next_due(&self) -> impl Future<Output = Result<Option<Millis>>> + Send;
    /// Lists runs, newest first.
    fn list_runs(&self, filter: &RunFilter)
    -> impl Future<Output = Result<Vec<RunSummary>>> + Send;
    /// One run with its actions and attempts.
    fn get_run(&self, id: &str) -> impl Future<Output = Result<Option<RunDetail>>> + Send;
    /// Deletes finished runs that finished before `before`; returns how many.
    fn prune(&self, before: Millis) -> impl Future<Output = Result<u64>> + Send;
    /// Checks the store answers.
    fn ping(&self) -> impl Future<Output = Result> + Send;
    /// Rings `wake` whenever any instance stores new work (PostgreSQL LISTEN/NOTIFY);
    /// a single-process store needs nothing here.
    fn listen(
        &self,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> impl Future<Output = Result> + Send;
}

/// Now, in store time.
pub fn now_millis() -> Millis {
    to_millis(std::time::SystemTime::now())
}

/// A `SystemTime` in store time.
pub fn to_millis(t: std::time::SystemTime) -> Millis {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A duration in store time (saturating).
pub fn millis(d: std::time::Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Store time as a `SystemTime`.
pub fn from_millis(ms: Millis) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Store time as RFC 3339.
pub fn rfc3339(ms: Millis) -> String {
    humantime::format_rfc3339_millis(from_millis(ms)).to_string()
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what}: {e}"))
}

/// Builds a run's detail from stored rows (shared by the SQLite and PostgreSQL stores):
/// actions not finished yet come from the pinned workflow as `pending`, and each
/// action gets its attempts.
#[allow(clippy::too_many_arguments)]
pub fn assemble(
    summary: RunSummary,
    version: String,
    file: Option<String>,
    source: Option<String>,
    payload: Option<String>,
    mut actions: Vec<ActionDetail>,
    attempts: Vec<(usize, String)>,
) -> Result<RunDetail> {
    if let Some(source) = &source
        && let Ok(loaded) = crate::workflow::load_str(file.as_deref().unwrap_or(""), source)
    {
        for (i, a) in loaded.workflow.actions.iter().enumerate() {
            if !actions.iter().any(|d| d.index == i) {
                actions.push(ActionDetail {
                    index: i,
                    id: a.id.clone(),
                    status: "pending".to_owned(),
                    attempts: 0,
                    http_status: None,
                    error: None,
                    message: None,
                    attempt_log: Vec::new(),
                });
            }
        }
        actions.sort_by_key(|a| a.index);
    }
    for (idx, text) in attempts {
        let record: AttemptRecord =
            serde_json::from_str(&text).map_err(|e| corrupt("attempt", e))?;
        if let Some(a) = actions.iter_mut().find(|a| a.index == idx) {
            if a.status == "pending" {
                a.attempts = record.attempt;
            }
            a.attempt_log.push(record);
        }
    }
    // `http_status` is the last status received, even when the last attempt got none.
    for a in &mut actions {
        if a.http_status.is_none() {
            a.http_status = a.attempt_log.iter().rev().find_map(|r| r.http_status);
        }
    }
    let payload = match payload {
        Some(p) => serde_json::from_str(&p).map_err(|e| corrupt("payload", e))?,
        None => Value::Null,
    };
    Ok(RunDetail {
        summary,
        version,
        file: file.unwrap_or_default(),
        payload,
        actions,
    })
}

/// A database URL without its password (in the user-info or a `password=`
/// parameter), for logs and errors.
pub fn redact_url(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    };
    match url.split_once('?') {
        Some((base, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=[redacted]"
                    } else {
                        kv
                    }
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db/x"),
            "postgres://app:[redacted]@db/x"
        );
        assert_eq!(
            redact_url("postgres://app@db/x?password=hunter2&sslmode=disable"),
            "postgres://app@db/x?password=[redacted]&sslmode=disable"
        );
        assert_eq!(redact_url("sqlite://flowrun.db"), "sqlite://flowrun.db");
    }
}
