//! The SQLite store (the default): WAL with `synchronous=FULL`, so a commit is
//! fsync'd; one writer thread that group-commits every write waiting in its
//! queue in one transaction; a separate connection for reads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::{
    ActionDetail, Claimed, Error, Millis, NewEvent, NextState, Result, RunDetail, RunFilter,
    RunSummary, StepRecord, Store, rfc3339,
};

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 1024;
/// Most writes waiting for the writer; beyond this, callers get [`Error::Busy`].
const MAX_QUEUE: usize = 65_536;

/// Schema changes, applied in order at start-up; never edit one that has shipped.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
    "CREATE TABLE workflow_versions (
        hash TEXT PRIMARY KEY, name TEXT NOT NULL, file TEXT NOT NULL, source TEXT NOT NULL);
     CREATE TABLE events (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, payload TEXT NOT NULL, received_at INTEGER NOT NULL);
     CREATE TABLE runs (
        id TEXT PRIMARY KEY, event_id TEXT NOT NULL, workflow TEXT NOT NULL, version_hash TEXT NOT NULL,
        trigger TEXT NOT NULL, status TEXT NOT NULL, next_action INTEGER NOT NULL, attempt INTEGER NOT NULL,
        delivery_id TEXT NOT NULL, first_attempt_at INTEGER, steps TEXT NOT NULL,
        due_at INTEGER, claimed_by TEXT, claimed_until INTEGER,
        created_at INTEGER NOT NULL, finished_at INTEGER);
     CREATE INDEX runs_due ON runs (due_at) WHERE status = 'pending';
     CREATE INDEX runs_workflow ON runs (workflow, id);
     CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
     CREATE TABLE actions (
        run_id TEXT NOT NULL, idx INTEGER NOT NULL, action_id TEXT, status TEXT NOT NULL,
        attempts INTEGER NOT NULL, http_status INTEGER, error TEXT, message TEXT,
        PRIMARY KEY (run_id, idx));
     CREATE TABLE attempts (
        run_id TEXT NOT NULL, idx INTEGER NOT NULL, attempt INTEGER NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (run_id, idx, attempt));",
    ),
    (
        2,
        "CREATE TABLE schedule_ticks (
            workflow TEXT NOT NULL, tick INTEGER NOT NULL, event_id TEXT NOT NULL,
            PRIMARY KEY (workflow, tick));",
    ),
];

enum Op {
    Ingest(NewEvent, oneshot::Sender<Result<bool>>),
    Claim {
        worker: String,
        now: Millis,
        lease_until: Millis,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Claimed>>>,
    },
    Record(Box<StepRecord>, oneshot::Sender<Result>),
    Release(Option<String>, oneshot::Sender<Result<u64>>),
    Renew(String, String, Millis, oneshot::Sender<Result<bool>>),
    Prune(Millis, oneshot::Sender<Result<u64>>),
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::SyncSender<Op>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteStore({})", self.path.display())
    }
}

/// The file a `sqlite://PATH` URL names.
pub fn path_from_url(url: &str) -> Result<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| Error::Url(url.to_owned()))?;
    if rest.is_empty() {
        return Err(Error::Url(url.to_owned()));
    }
    Ok(PathBuf::from(rest))
}

/// Takes the exclusive lock that makes one `serve` process the owner of a
/// database file (`PATH.lock`); held until the returned file is dropped or the
/// process dies. Two `serve`s on one SQLite file would release each other's claims.
pub fn lock(path: &Path) -> Result<std::fs::File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            Error::Locked(format!(
                "cannot open `{}`: {e}",
                std::path::Path::new(&lock_path).display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked(format!(
            "another flowrun serve is using `{}`; use PostgreSQL to run several instances",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::Locked(format!(
            "cannot lock `{}`: {e}",
            path.display()
        ))),
    }
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL + FULL: every commit is fsync'd before it returns; readers never block the writer.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")?;
    let tx = conn.transaction()?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, super::now_millis()],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies migrations, starts the writer.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = open(path)?;
        migrate(&mut conn)?;
        let reader = open(path)?;
        let (tx, rx) = mpsc::sync_channel(MAX_QUEUE);
        std::thread::Builder::new()
            .name("flowrun-sqlite-writer".into())
            .spawn(move || writer(conn, &rx))
            .map_err(|e| Error::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_path_buf(),
        })
    }

    /// Opens the database a `sqlite://PATH` URL names.
    pub fn open_url(url: &str) -> Result<Self> {
        Self::open(&path_from_url(url)?)
    }

    async fn send<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        // Never block the async caller: a full queue is an overload, answered at once.
        self.writer.try_send(op(tx)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => Error::Busy,
            mpsc::TrySendError::Disconnected(_) => Error::Closed,
        })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&conn)
        })
        .await
        .map_err(|e| Error::Corrupt(format!("reader task failed: {e}")))?
    }
}

/// The writer thread: take every queued write, apply them in one transaction, commit once.
fn writer(mut conn: Connection, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let outcome = apply_batch(&mut conn, batch);
        match outcome {
            Ok(replies) => replies.into_iter().for_each(Reply::send),
            Err((e, replies)) => {
                let message = e.to_string();
                for r in replies {
                    r.fail(&message);
                }
            }
        }
    }
}

enum Reply {
    Unit(oneshot::Sender<Result>, Result),
    Flag(oneshot::Sender<Result<bool>>, Result<bool>),
    Claims(oneshot::Sender<Result<Vec<Claimed>>>, Result<Vec<Claimed>>),
    Count(oneshot::Sender<Result<u64>>, Result<u64>),
}

impl Reply {
    fn send(self) {
        // A caller that stopped waiting (e.g. a dropped request) is not an error here.
        match self {
            Reply::Unit(tx, r) => drop(tx.send(r)),
            Reply::Flag(tx, r) => drop(tx.send(r)),
            Reply::Claims(tx, r) => drop(tx.send(r)),
            Reply::Count(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, message: &str) {
        match self {
            Reply::Unit(tx, _) => drop(tx.send(commit_failed(message))),
            Reply::Flag(tx, _) => drop(tx.send(commit_failed(message))),
            Reply::Claims(tx, _) => drop(tx.send(commit_failed(message))),
            Reply::Count(tx, _) => drop(tx.send(commit_failed(message))),
        }
    }
}

fn commit_failed<T>(message: &str) -> Result<T> {
    Err(Error::Commit(message.to_owned()))
}

type BatchResult = std::result::Result<Vec<Reply>, (rusqlite::Error, Vec<Reply>)>;

fn apply_batch(conn: &mut Connection, batch: Vec<Op>) -> BatchResult {
    let mut replies = Vec::with_capacity(batch.len());
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Answer everyone with the error.
            for op in batch {
                replies.push(op_failed(op));
            }
            return Err((e, replies));
        }
    };
    for op in batch {
        // Each op in its own savepoint: one bad write does not undo the others.
        replies.push(apply_one(&tx, op));
    }
    match tx.commit() {
        Ok(()) => Ok(replies),
        Err(e) => Err((e, replies)),
    }
}

fn op_failed(op: Op) -> Reply {
    match op {
        Op::Ingest(_, tx) => Reply::Flag(tx, Err(Error::Closed)),
        Op::Record(_, tx) => Reply::Unit(tx, Err(Error::Closed)),
        Op::Claim { reply, .. } => Reply::Claims(reply, Err(Error::Closed)),
        Op::Release(_, tx) | Op::Prune(_, tx) => Reply::Count(tx, Err(Error::Closed)),
        Op::Renew(.., tx) => Reply::Flag(tx, Err(Error::Closed)),
    }
}

fn savepoint<T>(tx: &Transaction<'_>, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
    tx.execute_batch("SAVEPOINT op")?;
    match f(tx) {
        Ok(v) => {
            tx.execute_batch("RELEASE op")?;
            Ok(v)
        }
        Err(e) => {
            tx.execute_batch("ROLLBACK TO op; RELEASE op")?;
            Err(e)
        }
    }
}

fn apply_one(tx: &Transaction<'_>, op: Op) -> Reply {
    match op {
        Op::Ingest(event, reply) => Reply::Flag(reply, savepoint(tx, |tx| ingest(tx, &event))),
        Op::Claim {
            worker,
            now,
            lease_until,
            limit,
            reply,
        } => Reply::Claims(
            reply,
            savepoint(tx, |tx| claim(tx, &worker, now, lease_until, limit)),
        ),
        Op::Record(step, reply) => Reply::Unit(reply, savepoint(tx, |tx| record(tx, &step))),
        Op::Release(worker, reply) => {
            Reply::Count(reply, savepoint(tx, |tx| release(tx, worker.as_deref())))
        }
        Op::Renew(run, worker, until, reply) => Reply::Flag(
            reply,
            savepoint(tx, |tx| {
                let n = tx
                    .prepare_cached(
                        "UPDATE runs SET claimed_until = ?3 WHERE id = ?1 AND claimed_by = ?2",
                    )?
                    .execute(params![run, worker, until])?;
                Ok(n == 1)
            }),
        ),
        Op::Prune(before, reply) => Reply::Count(reply, savepoint(tx, |tx| prune(tx, before))),
    }
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| panic!("BUG: stored values serialize: {e}"))
}

fn ingest(tx: &Transaction<'_>, event: &NewEvent) -> Result<bool> {
    if let Some((workflow, tick)) = &event.tick {
        let fresh = tx
            .prepare_cached("INSERT OR IGNORE INTO schedule_ticks (workflow, tick, event_id) VALUES (?1, ?2, ?3)")?
            .execute(params![workflow, tick, event.id])?;
        if fresh == 0 {
            return Ok(false);
        }
    }
    tx.prepare_cached(
        "INSERT INTO events (id, name, payload, received_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        event.id,
        event.name,
        json_text(&event.payload),
        event.received_at
    ])?;
    for run in &event.runs {
        let v = &run.version;
        tx.prepare_cached("INSERT OR IGNORE INTO workflow_versions (hash, name, file, source) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![v.hash, v.name, v.file, v.source])?;
        tx.prepare_cached(
            "INSERT INTO runs (id, event_id, workflow, version_hash, trigger, status, next_action, attempt,
                               delivery_id, steps, due_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, 1, ?6, '{}', ?7, ?7)",
        )?
        .execute(params![
            run.id,
            event.id,
            v.name,
            v.hash,
            json_text(&run.trigger),
            run.delivery_id,
            event.received_at
        ])?;
    }
    Ok(true)
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

fn claim(
    tx: &Transaction<'_>,
    worker: &str,
    now: Millis,
    lease_until: Millis,
    limit: usize,
) -> Result<Vec<Claimed>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let ids: Vec<String> = tx
        .prepare_cached(
            "UPDATE runs SET claimed_by = ?1, claimed_until = ?2
             WHERE id IN (SELECT id FROM runs
                          WHERE status = 'pending' AND due_at <= ?3
                            AND (claimed_until IS NULL OR claimed_until < ?3)
                          ORDER BY due_at LIMIT ?4)
             RETURNING id",
        )?
        .query_map(params![worker, lease_until, now, limit], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    let mut stmt = tx.prepare_cached(
        "SELECT r.version_hash, e.payload, r.trigger, r.next_action, r.attempt,
                r.delivery_id, r.first_attempt_at, r.steps
         FROM runs r JOIN events e ON e.id = r.event_id
         WHERE r.id = ?1",
    )?;
    for id in ids {
        let row = stmt.query_row([&id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        out.push(Claimed {
            id,
            version_hash: row.0,
            payload: parse_json(&row.1, "payload")?,
            trigger: parse_json(&row.2, "trigger")?,
            next_action: usize::try_from(row.3).unwrap_or(0),
            attempt: u32::try_from(row.4).unwrap_or(1),
            delivery_id: row.5,
            first_attempt_at: row.6,
            steps: parse_json::<Map<String, Value>>(&row.7, "steps")?,
        });
    }
    Ok(out)
}

fn record(tx: &Transaction<'_>, step: &StepRecord) -> Result {
    let idx = i64::try_from(step.action).unwrap_or(i64::MAX);
    // Fenced: only the worker that holds the claim moves the run on. A worker whose
    // lease ended and was taken over gets LostClaim, and the savepoint undoes it all.
    // (Only pending runs have a claimant. No `status = 'pending'` here: it would let
    // SQLite pick the partial due-time index and scan every pending run.)
    let moved = match &step.next {
        NextState::Retry {
            attempt,
            due_at,
            first_attempt_at,
        } => tx
            .prepare_cached(
                "UPDATE runs SET attempt = ?2, due_at = ?3, first_attempt_at = ?4, claimed_by = NULL, claimed_until = NULL
                 WHERE id = ?1 AND claimed_by = ?5",
            )?
            .execute(params![step.run_id, attempt, due_at, first_attempt_at, step.worker])?,
        NextState::Advance {
            next_action,
            delivery_id,
            steps,
        } => tx
            .prepare_cached(
                "UPDATE runs SET next_action = ?2, attempt = 1, delivery_id = ?3, first_attempt_at = NULL,
                                 steps = ?4, due_at = ?5, claimed_until = ?6
                 WHERE id = ?1 AND claimed_by = ?7",
            )?
            .execute(params![
                step.run_id,
                i64::try_from(*next_action).unwrap_or(i64::MAX),
                delivery_id,
                json_text(steps),
                step.at,
                step.lease_until,
                step.worker
            ])?,
        NextState::Finished { status, .. } => tx
            .prepare_cached(
                "UPDATE runs SET status = ?2, finished_at = ?3, due_at = NULL, claimed_by = NULL, claimed_until = NULL,
                                 steps = '{}'
                 WHERE id = ?1 AND claimed_by = ?4",
            )?
            .execute(params![step.run_id, status, step.at, step.worker])?,
    };
    if moved == 0 {
        return Err(Error::LostClaim);
    }
    if let Some(a) = &step.attempt {
        tx.prepare_cached("INSERT OR REPLACE INTO attempts (run_id, idx, attempt, record) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![step.run_id, idx, a.attempt, json_text(a)])?;
    }
    if let Some(r) = &step.report {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO actions (run_id, idx, action_id, status, attempts, http_status, error, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![step.run_id, idx, r.id, r.status.as_str(), r.attempts, r.http_status, r.error, r.message])?;
    }
    if let NextState::Finished { not_run, .. } = &step.next {
        for (i, id) in not_run {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO actions (run_id, idx, action_id, status, attempts) VALUES (?1, ?2, ?3, 'not_run', 0)",
            )?
            .execute(params![step.run_id, i64::try_from(*i).unwrap_or(i64::MAX), id])?;
        }
    }
    Ok(())
}

fn release(tx: &Transaction<'_>, worker: Option<&str>) -> Result<u64> {
    let n = match worker {
        Some(w) => tx.execute(
            "UPDATE runs SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = ?1 AND status = 'pending'",
            [w],
        )?,
        None => tx.execute(
            "UPDATE runs SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by IS NOT NULL AND status = 'pending'",
            [],
        )?,
    };
    Ok(n as u64)
}

fn prune(tx: &Transaction<'_>, before: Millis) -> Result<u64> {
    let old = "SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?1";
    tx.execute(
        &format!("DELETE FROM attempts WHERE run_id IN ({old})"),
        [before],
    )?;
    tx.execute(
        &format!("DELETE FROM actions WHERE run_id IN ({old})"),
        [before],
    )?;
    let n = tx.execute(
        "DELETE FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?1",
        [before],
    )?;
    tx.execute(
        "DELETE FROM events WHERE received_at < ?1 AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.event_id = events.id)",
        [before],
    )?;
    // Keep each schedule's latest tick: it dates the ticks missed while flowrun was down.
    tx.execute(
        "DELETE FROM schedule_ticks WHERE tick < ?1
           AND tick < (SELECT MAX(tick) FROM schedule_ticks t WHERE t.workflow = schedule_ticks.workflow)",
        [before],
    )?;
    tx.execute(
        "DELETE FROM workflow_versions WHERE NOT EXISTS (SELECT 1 FROM runs WHERE runs.version_hash = workflow_versions.hash)",
        [],
    )?;
    Ok(n as u64)
}

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunSummary> {
    let status: String = r.get(3)?;
    let due: Option<i64> = r.get(6)?;
    Ok(RunSummary {
        id: r.get(0)?,
        workflow: r.get(1)?,
        event_id: r.get(2)?,
        due_at: if status == "pending" {
            due.map(rfc3339)
        } else {
            None
        },
        status,
        created_at: rfc3339(r.get(4)?),
        finished_at: r.get::<_, Option<i64>>(5)?.map(rfc3339),
    })
}

const SUMMARY_COLUMNS: &str = "id, workflow, event_id, status, created_at, finished_at, due_at";

impl Store for SqliteStore {
    async fn last_ticks(&self) -> Result<Vec<(String, Millis)>> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT workflow, MAX(tick) FROM schedule_ticks GROUP BY workflow",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn queue_depth(&self) -> Result<(u64, u64)> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(attempt > 1), 0) FROM runs WHERE status = 'pending'",
            )?
            .query_row([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?)
        })
        .await
    }

    async fn ingest(&self, event: NewEvent) -> Result<bool> {
        self.send(|tx| Op::Ingest(event, tx)).await
    }

    async fn claim(
        &self,
        worker: &str,
        now: Millis,
        lease_until: Millis,
        limit: usize,
    ) -> Result<Vec<Claimed>> {
        let worker = worker.to_owned();
        self.send(|reply| Op::Claim {
            worker,
            now,
            lease_until,
            limit,
            reply,
        })
        .await
    }

    async fn record(&self, step: StepRecord) -> Result {
        self.send(|tx| Op::Record(Box::new(step), tx)).await
    }

    async fn renew(&self, run_id: &str, worker: &str, until: Millis) -> Result<bool> {
        let (run, worker) = (run_id.to_owned(), worker.to_owned());
        self.send(|tx| Op::Renew(run, worker, until, tx)).await
    }

    async fn release(&self, worker: &str) -> Result<u64> {
        let worker = Some(worker.to_owned());
        self.send(|tx| Op::Release(worker, tx)).await
    }

    async fn recover(&self, _now: Millis) -> Result<u64> {
        // The lock file makes this process the only one on the file: every claim is stale.
        self.send(|tx| Op::Release(None, tx)).await
    }

    async fn version(&self, hash: &str) -> Result<Option<(String, String)>> {
        let hash = hash.to_owned();
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT file, source FROM workflow_versions WHERE hash = ?1")?
                    .query_row([hash], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?,
            )
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT MIN(due_at) FROM runs WHERE status = 'pending' AND claimed_by IS NULL",
            )?
            .query_row([], |r| r.get(0))?)
        })
        .await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let f = filter.clone();
        self.read(move |c| {
            let limit = i64::from(f.limit.unwrap_or(50).clamp(1, 1000));
            let sql = format!(
                "SELECT {SUMMARY_COLUMNS} FROM runs
                 WHERE (?1 IS NULL OR workflow = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR id < ?3)
                 ORDER BY id DESC LIMIT ?4"
            );
            let rows = c
                .prepare_cached(&sql)?
                .query_map(params![f.workflow, f.status, f.before, limit], summary)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunDetail>> {
        let id = id.to_owned();
        self.read(move |c| get_run(c, &id)).await
    }

    async fn prune(&self, before: Millis) -> Result<u64> {
        self.send(|tx| Op::Prune(before, tx)).await
    }

    async fn listen(&self, _wake: Arc<tokio::sync::Notify>) -> Result {
        // One process per file: ingest rings the workers directly.
        Ok(())
    }

    async fn ping(&self) -> Result {
        self.read(|c| {
            Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)?)
        })
        .await
    }
}

fn get_run(c: &Connection, id: &str) -> Result<Option<RunDetail>> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, version_hash, next_action,
                (SELECT payload FROM events WHERE events.id = runs.event_id),
                (SELECT source FROM workflow_versions WHERE hash = runs.version_hash),
                (SELECT file FROM workflow_versions WHERE hash = runs.version_hash)
         FROM runs WHERE id = ?1"
    );
    let Some((summary, version, payload, source, file)) = c
        .prepare_cached(&sql)?
        .query_row([id], |r| {
            Ok((
                summary(r)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<String>>(10)?,
                r.get::<_, Option<String>>(11)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let actions: Vec<ActionDetail> = c
        .prepare_cached(
            "SELECT idx, action_id, status, attempts, http_status, error, message FROM actions WHERE run_id = ?1 ORDER BY idx",
        )?
        .query_map([id], |r| {
            Ok(ActionDetail {
                index: usize::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                id: r.get(1)?,
                status: r.get(2)?,
                attempts: r.get(3)?,
                http_status: r.get(4)?,
                error: r.get(5)?,
                message: r.get(6)?,
                attempt_log: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let attempts: Vec<(usize, String)> = c
        .prepare_cached("SELECT idx, record FROM attempts WHERE run_id = ?1 ORDER BY idx, attempt")?
        .query_map([id], |r| {
            Ok((usize::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    super::assemble(summary, version, file, source, payload, actions, attempts).map(Some)
}
