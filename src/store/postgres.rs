//! The PostgreSQL store: several `serve` instances share one queue.
//!
//! Claims use `SELECT … FOR UPDATE SKIP LOCKED` with a lease (`claimed_by`,
//! `claimed_until`) renewed during long attempts; work held by an instance
//! that died is claimable again when its lease ends. New events and newly due
//! retries are announced with `NOTIFY flowrun_wake`; polling stays the fallback.

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_postgres::NoTls;

use super::{
    ActionDetail, Claimed, Error, Millis, NewEvent, NextState, Result, RunDetail, RunFilter,
    RunSummary, StepRecord, Store, rfc3339,
};

/// The channel instances LISTEN on.
const CHANNEL: &str = "flowrun_wake";

/// Schema changes, applied in order at start-up under an advisory lock.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE workflow_versions (
        hash TEXT PRIMARY KEY, name TEXT NOT NULL, file TEXT NOT NULL, source TEXT NOT NULL);
     CREATE TABLE events (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, payload TEXT NOT NULL, received_at BIGINT NOT NULL);
     CREATE TABLE runs (
        id TEXT PRIMARY KEY, event_id TEXT NOT NULL, workflow TEXT NOT NULL, version_hash TEXT NOT NULL,
        trigger TEXT NOT NULL, status TEXT NOT NULL, next_action BIGINT NOT NULL, attempt BIGINT NOT NULL,
        delivery_id TEXT NOT NULL, first_attempt_at BIGINT, steps TEXT NOT NULL,
        due_at BIGINT, claimed_by TEXT, claimed_until BIGINT,
        created_at BIGINT NOT NULL, finished_at BIGINT);
     CREATE INDEX runs_due ON runs (due_at) WHERE status = 'pending';
     CREATE INDEX runs_workflow ON runs (workflow, id);
     CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
     CREATE TABLE actions (
        run_id TEXT NOT NULL, idx BIGINT NOT NULL, action_id TEXT, status TEXT NOT NULL,
        attempts BIGINT NOT NULL, http_status INTEGER, error TEXT, message TEXT,
        PRIMARY KEY (run_id, idx));
     CREATE TABLE attempts (
        run_id TEXT NOT NULL, idx BIGINT NOT NULL, attempt BIGINT NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (run_id, idx, attempt));
     CREATE TABLE schedule_ticks (
        workflow TEXT NOT NULL, tick BIGINT NOT NULL, event_id TEXT NOT NULL,
        PRIMARY KEY (workflow, tick));",
)];

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // "db error" alone says nothing: give the server's message when there is one.
        match e.as_db_error() {
            Some(db) => Error::Postgres(format!("{}: {}", db.code().code(), db.message())),
            None => Error::Postgres(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Postgres(e.to_string())
    }
}

/// Most events committed in one ingest transaction.
const MAX_BATCH: usize = 512;

type Ingest = (NewEvent, tokio::sync::oneshot::Sender<Result<bool>>);
type Record = (StepRecord, tokio::sync::oneshot::Sender<Result>);

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Group commit: concurrent ingests share one transaction.
    ingests: tokio::sync::mpsc::Sender<Ingest>,
    /// Group commit of workers' step records.
    records: tokio::sync::mpsc::Sender<Record>,
    /// Rung after new work is committed; a task turns it into (coalesced) NOTIFYs.
    notify: Arc<Notify>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

/// Splits our own `schema=NAME` query parameter off a `postgres://` URL.
fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("schema=") {
            Some(s) => {
                schema = Some(s.to_owned());
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, schema)
}

fn i(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| panic!("BUG: stored values serialize: {e}"))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

impl PgStore {
    /// Connects (pool of `max_size`), creates the `schema=` schema if named, applies migrations.
    pub async fn connect(url: &str, max_size: usize) -> Result<Self> {
        let (url, schema) = split_schema(url);
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Url(format!("{}: {e}", super::redact_url(&url))))?;
        if let Some(schema) = &schema {
            if !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(Error::Url(format!(
                    "schema `{schema}`: use letters, digits and `_`"
                )));
            }
            let (client, conn) = config.connect(NoTls).await?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await?;
            config.options(format!("-c search_path={schema}"));
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size.max(2))
            .build()
            .map_err(|e| Error::Postgres(e.to_string()))?;
        let (ingests, rx) = tokio::sync::mpsc::channel(16 * MAX_BATCH);
        let (records, records_rx) = tokio::sync::mpsc::channel(16 * MAX_BATCH);
        let notify = Arc::new(Notify::new());
        let store = PgStore {
            pool,
            config,
            ingests,
            records,
            notify: Arc::clone(&notify),
        };
        store.migrate().await?;
        tokio::spawn(batcher(store.pool.clone(), rx, Arc::clone(&notify)));
        tokio::spawn(recorder(
            store.pool.clone(),
            records_rx,
            Arc::clone(&notify),
        ));
        tokio::spawn(notifier(store.pool.clone(), notify));
        Ok(store)
    }

    async fn migrate(&self) -> Result {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Two instances starting together: one migrates, the other waits and sees it done.
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7246154);
             CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);",
        )
        .await?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .get(0);
        for (version, sql) in MIGRATIONS {
            if *version > current {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[version, &super::now_millis()],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

fn summary(r: &tokio_postgres::Row) -> RunSummary {
    let status: String = r.get(3);
    let due: Option<i64> = r.get(6);
    RunSummary {
        id: r.get(0),
        workflow: r.get(1),
        event_id: r.get(2),
        due_at: if status == "pending" {
            due.map(rfc3339)
        } else {
            None
        },
        status,
        created_at: rfc3339(r.get(4)),
        finished_at: r.get::<_, Option<i64>>(5).map(rfc3339),
    }
}

const SUMMARY_COLUMNS: &str = "id, workflow, event_id, status, created_at, finished_at, due_at";

/// Writes every queued ingest in one transaction (multi-row inserts), commits once,
/// then answers each: PostgreSQL's fsync is paid once per batch, not per event.
async fn batcher(pool: Pool, mut rx: tokio::sync::mpsc::Receiver<Ingest>, notify: Arc<Notify>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let events: Vec<&NewEvent> = batch.iter().map(|(e, _)| e).collect();
        let result = insert_batch(&pool, &events).await;
        if result.is_ok() && events.iter().any(|e| !e.runs.is_empty()) {
            notify.notify_one();
        }
        for (_, reply) in batch.drain(..) {
            let r = match &result {
                Ok(()) => Ok(true),
                Err(e) => Err(Error::Postgres(e.to_string())),
            };
            // A caller that stopped waiting is not an error here.
            drop(reply.send(r));
        }
    }
}

async fn insert_batch(pool: &Pool, events: &[&NewEvent]) -> Result {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let (mut ids, mut names, mut payloads, mut received) = (vec![], vec![], vec![], vec![]);
    let (
        mut run_ids,
        mut run_events,
        mut workflows,
        mut hashes,
        mut triggers,
        mut deliveries,
        mut run_at,
    ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut versions: std::collections::BTreeMap<&str, &super::Version> =
        std::collections::BTreeMap::new();
    for e in events {
        ids.push(e.id.as_str());
        names.push(text(&e.name));
        payloads.push(text(&json_text(&e.payload)));
        received.push(e.received_at);
        for r in &e.runs {
            run_ids.push(r.id.as_str());
            run_events.push(e.id.as_str());
            workflows.push(r.version.name.as_str());
            hashes.push(r.version.hash.as_str());
            triggers.push(text(&json_text(&r.trigger)));
            deliveries.push(r.delivery_id.as_str());
            run_at.push(e.received_at);
            versions.insert(r.version.hash.as_str(), &r.version);
        }
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (id, name, payload, received_at)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[])",
        )
        .await?;
    tx.execute(&stmt, &[&ids, &names, &payloads, &received])
        .await?;
    for v in versions.values() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO workflow_versions (hash, name, file, source) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&stmt, &[&v.hash, &v.name, &v.file, &v.source])
            .await?;
    }
    if !run_ids.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO runs (id, event_id, workflow, version_hash, trigger, status, next_action, attempt,
                                   delivery_id, steps, due_at, created_at)
                 SELECT r.id, r.ev, r.wf, r.hash, r.trig, 'pending', 0, 1, r.del, '{}', r.at, r.at
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[])
                      AS r(id, ev, wf, hash, trig, del, at)",
            )
            .await?;
        tx.execute(
            &stmt,
            &[
                &run_ids,
                &run_events,
                &workflows,
                &hashes,
                &triggers,
                &deliveries,
                &run_at,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Writes every queued step record in one transaction, a few multi-row statements
/// for all of them, and commits once.
async fn recorder(pool: Pool, mut rx: tokio::sync::mpsc::Receiver<Record>, notify: Arc<Notify>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let steps: Vec<&StepRecord> = batch.iter().map(|(s, _)| s).collect();
        let result = record_batch(&pool, &steps).await;
        if result.is_ok()
            && steps
                .iter()
                .any(|s| matches!(s.next, NextState::Retry { .. }))
        {
            // Other instances recompute their timer for the new due time.
            notify.notify_one();
        }
        for (step, reply) in batch.drain(..) {
            drop(reply.send(match &result {
                Ok(moved) if moved.contains(&step.run_id) => Ok(()),
                Ok(_) => Err(Error::LostClaim),
                Err(e) => Err(Error::Postgres(e.to_string())),
            }));
        }
    }
}

/// PostgreSQL TEXT cannot hold U+0000; a NUL from a payload or a response must not
/// fail a whole group commit.
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

fn opt_text(s: Option<&String>) -> Option<String> {
    s.map(|s| text(s))
}

#[derive(Default)]
struct Columns {
    // attempts
    a_run: Vec<String>,
    a_idx: Vec<i64>,
    a_attempt: Vec<i64>,
    a_record: Vec<String>,
    // actions
    r_run: Vec<String>,
    r_idx: Vec<i64>,
    r_id: Vec<Option<String>>,
    r_status: Vec<String>,
    r_attempts: Vec<i64>,
    r_http: Vec<Option<i32>>,
    r_error: Vec<Option<String>>,
    r_message: Vec<Option<String>>,
    // retries
    t_run: Vec<String>,
    t_worker: Vec<String>,
    t_attempt: Vec<i64>,
    t_due: Vec<i64>,
    t_first: Vec<i64>,
    // advances
    v_run: Vec<String>,
    v_worker: Vec<String>,
    v_next: Vec<i64>,
    v_delivery: Vec<String>,
    v_steps: Vec<String>,
    v_at: Vec<i64>,
    v_lease: Vec<i64>,
    // finishes
    f_run: Vec<String>,
    f_worker: Vec<String>,
    f_status: Vec<String>,
    f_at: Vec<i64>,
}

impl Columns {
    fn action(
        &mut self,
        run: &str,
        idx: i64,
        id: Option<String>,
        status: &str,
        attempts: i64,
    ) -> usize {
        self.r_run.push(run.to_owned());
        self.r_idx.push(idx);
        self.r_id.push(id);
        self.r_status.push(status.to_owned());
        self.r_attempts.push(attempts);
        self.r_http.push(None);
        self.r_error.push(None);
        self.r_message.push(None);
        self.r_run.len() - 1
    }
}

/// Records a batch of steps in one transaction. Each run moves on only if the
/// recording worker still holds its claim (fencing); returns the runs that moved.
async fn record_batch(
    pool: &Pool,
    steps: &[&StepRecord],
) -> Result<std::collections::HashSet<String>> {
    let mut c = Columns::default();
    for step in steps {
        match &step.next {
            NextState::Retry {
                attempt,
                due_at,
                first_attempt_at,
            } => {
                c.t_run.push(step.run_id.clone());
                c.t_worker.push(step.worker.clone());
                c.t_attempt.push(i64::from(*attempt));
                c.t_due.push(*due_at);
                c.t_first.push(*first_attempt_at);
            }
            NextState::Advance {
                next_action,
                delivery_id,
                steps,
            } => {
                c.v_run.push(step.run_id.clone());
                c.v_worker.push(step.worker.clone());
                c.v_next.push(i(*next_action));
                c.v_delivery.push(delivery_id.clone());
                c.v_steps.push(text(&json_text(steps)));
                c.v_at.push(step.at);
                c.v_lease.push(step.lease_until);
            }
            NextState::Finished { status, .. } => {
                c.f_run.push(step.run_id.clone());
                c.f_worker.push(step.worker.clone());
                c.f_status.push((*status).to_owned());
                c.f_at.push(step.at);
            }
        }
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut moved = std::collections::HashSet::new();
    if !c.t_run.is_empty() {
        let stmt = tx
            .prepare_cached(
                "UPDATE runs SET attempt = u.attempt, due_at = u.due, first_attempt_at = u.first,
                                 claimed_by = NULL, claimed_until = NULL
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[])
                      AS u(id, worker, attempt, due, first)
                 WHERE runs.id = u.id AND runs.claimed_by = u.worker AND runs.status = 'pending'
                 RETURNING runs.id",
            )
            .await?;
        for r in tx
            .query(
                &stmt,
                &[&c.t_run, &c.t_worker, &c.t_attempt, &c.t_due, &c.t_first],
            )
            .await?
        {
            moved.insert(r.get::<_, String>(0));
        }
    }
    if !c.v_run.is_empty() {
        let stmt = tx
            .prepare_cached(
                "UPDATE runs SET next_action = u.next, attempt = 1, delivery_id = u.delivery, first_attempt_at = NULL,
                                 steps = u.steps, due_at = u.at, claimed_until = u.lease
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[], $7::BIGINT[])
                      AS u(id, worker, next, delivery, steps, at, lease)
                 WHERE runs.id = u.id AND runs.claimed_by = u.worker AND runs.status = 'pending'
                 RETURNING runs.id",
            )
            .await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &c.v_run,
            &c.v_worker,
            &c.v_next,
            &c.v_delivery,
            &c.v_steps,
            &c.v_at,
            &c.v_lease,
        ];
        for r in tx.query(&stmt, &params).await? {
            moved.insert(r.get::<_, String>(0));
        }
    }
    if !c.f_run.is_empty() {
        let stmt = tx
            .prepare_cached(
                "UPDATE runs SET status = u.status, finished_at = u.at, due_at = NULL, claimed_by = NULL,
                                 claimed_until = NULL, steps = '{}'
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS u(id, worker, status, at)
                 WHERE runs.id = u.id AND runs.claimed_by = u.worker AND runs.status = 'pending'
                 RETURNING runs.id",
            )
            .await?;
        for r in tx
            .query(&stmt, &[&c.f_run, &c.f_worker, &c.f_status, &c.f_at])
            .await?
        {
            moved.insert(r.get::<_, String>(0));
        }
    }
    // Attempts and action results only for runs this worker still owned.
    for step in steps.iter().filter(|s| moved.contains(&s.run_id)) {
        let idx = i(step.action);
        if let Some(a) = &step.attempt {
            c.a_run.push(step.run_id.clone());
            c.a_idx.push(idx);
            c.a_attempt.push(i64::from(a.attempt));
            c.a_record.push(text(&json_text(a)));
        }
        if let Some(r) = &step.report {
            let n = c.action(
                &step.run_id,
                idx,
                opt_text(r.id.as_ref()),
                r.status.as_str(),
                i64::from(r.attempts),
            );
            c.r_http[n] = r.http_status.map(i32::from);
            c.r_error[n] = opt_text(r.error.as_ref());
            c.r_message[n] = opt_text(r.message.as_ref());
        }
        if let NextState::Finished { not_run, .. } = &step.next {
            for (n, id) in not_run {
                c.action(&step.run_id, i(*n), id.clone(), "not_run", 0);
            }
        }
    }
    if !c.a_run.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO attempts (run_id, idx, attempt, record)
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[])
                 ON CONFLICT (run_id, idx, attempt) DO UPDATE SET record = EXCLUDED.record",
            )
            .await?;
        tx.execute(&stmt, &[&c.a_run, &c.a_idx, &c.a_attempt, &c.a_record])
            .await?;
    }
    if !c.r_run.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO actions (run_id, idx, action_id, status, attempts, http_status, error, message)
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::INT[],
                                      $7::TEXT[], $8::TEXT[])
                 ON CONFLICT (run_id, idx) DO UPDATE SET action_id = EXCLUDED.action_id, status = EXCLUDED.status,
                    attempts = EXCLUDED.attempts, http_status = EXCLUDED.http_status, error = EXCLUDED.error,
                    message = EXCLUDED.message",
            )
            .await?;
        tx.execute(
            &stmt,
            &[
                &c.r_run,
                &c.r_idx,
                &c.r_id,
                &c.r_status,
                &c.r_attempts,
                &c.r_http,
                &c.r_error,
                &c.r_message,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(moved)
}

/// Turns "new work committed" into NOTIFYs, at most one per 2 ms: a NOTIFY takes a
/// cluster-wide lock until its transaction commits, so one per event would serialize ingest.
async fn notifier(pool: Pool, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        match pool.get().await {
            Ok(client) => {
                if let Err(e) = client.batch_execute(&format!("NOTIFY {CHANNEL}")).await {
                    tracing::warn!("NOTIFY failed: {e}");
                }
            }
            Err(e) => tracing::warn!("NOTIFY failed: {e}"),
        }
    }
}

impl PgStore {
    /// A schedule tick: stored with its event in one transaction, at most once.
    async fn ingest_tick(&self, event: NewEvent, workflow: &str, tick: Millis) -> Result<bool> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let fresh = tx
            .execute(
                "INSERT INTO schedule_ticks (workflow, tick, event_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&workflow, &tick, &event.id],
            )
            .await?;
        if fresh == 0 {
            return Ok(false);
        }
        let insert_event = tx
            .prepare_cached(
                "INSERT INTO events (id, name, payload, received_at) VALUES ($1, $2, $3, $4)",
            )
            .await?;
        tx.execute(
            &insert_event,
            &[
                &event.id,
                &event.name,
                &json_text(&event.payload),
                &event.received_at,
            ],
        )
        .await?;
        let insert_version = tx
            .prepare_cached(
                "INSERT INTO workflow_versions (hash, name, file, source) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .await?;
        let insert_run = tx
            .prepare_cached(
                "INSERT INTO runs (id, event_id, workflow, version_hash, trigger, status, next_action, attempt,
                                   delivery_id, steps, due_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, 'pending', 0, 1, $6, '{}', $7, $7)",
            )
            .await?;
        for run in &event.runs {
            let v = &run.version;
            tx.execute(&insert_version, &[&v.hash, &v.name, &v.file, &v.source])
                .await?;
            tx.execute(
                &insert_run,
                &[
                    &run.id,
                    &event.id,
                    &v.name,
                    &v.hash,
                    &json_text(&run.trigger),
                    &run.delivery_id,
                    &event.received_at,
                ],
            )
            .await?;
        }
        tx.commit().await?;
        self.notify.notify_one();
        Ok(true)
    }
}

impl Store for PgStore {
    async fn ingest(&self, event: NewEvent) -> Result<bool> {
        if let Some((workflow, tick)) = event.tick.clone() {
            return self.ingest_tick(event, &workflow, tick).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ingests.try_send((event, tx)).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => Error::Busy,
            tokio::sync::mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn last_ticks(&self) -> Result<Vec<(String, Millis)>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT workflow, MAX(tick) FROM schedule_ticks GROUP BY workflow",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn queue_depth(&self) -> Result<(u64, u64)> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE attempt > 1) FROM runs WHERE status = 'pending'",
                &[],
            )
            .await?;
        let (a, b): (i64, i64) = (row.get(0), row.get(1));
        Ok((u64::try_from(a).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
    }

    async fn claim(
        &self,
        worker: &str,
        now: Millis,
        lease_until: Millis,
        limit: usize,
    ) -> Result<Vec<Claimed>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "WITH due AS (
                    SELECT id FROM runs
                    WHERE status = 'pending' AND due_at <= $3
                      AND (claimed_until IS NULL OR claimed_until < $3)
                    ORDER BY due_at LIMIT $4
                    FOR UPDATE SKIP LOCKED)
                 UPDATE runs r SET claimed_by = $1, claimed_until = $2 FROM due WHERE r.id = due.id
                 RETURNING r.id, r.version_hash, (SELECT payload FROM events e WHERE e.id = r.event_id),
                           r.trigger, r.next_action, r.attempt, r.delivery_id, r.first_attempt_at, r.steps",
            )
            .await?;
        let rows = client
            .query(&stmt, &[&worker, &lease_until, &now, &i(limit)])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.get(0),
                    version_hash: r.get(1),
                    payload: parse_json(r.get::<_, &str>(2), "payload")?,
                    trigger: parse_json(r.get::<_, &str>(3), "trigger")?,
                    next_action: usize::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                    attempt: u32::try_from(r.get::<_, i64>(5)).unwrap_or(1),
                    delivery_id: r.get(6),
                    first_attempt_at: r.get(7),
                    steps: parse_json::<Map<String, Value>>(r.get::<_, &str>(8), "steps")?,
                })
            })
            .collect()
    }

    async fn record(&self, step: StepRecord) -> Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.records.try_send((step, tx)).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => Error::Busy,
            tokio::sync::mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn renew(&self, run_id: &str, worker: &str, until: Millis) -> Result<bool> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE runs SET claimed_until = $3 WHERE id = $1 AND claimed_by = $2 AND status = 'pending'",
                &[&run_id, &worker, &until],
            )
            .await?;
        Ok(n == 1)
    }

    async fn release(&self, worker: &str) -> Result<u64> {
        let client = self.pool.get().await?;
        Ok(client
            .execute(
                "UPDATE runs SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1 AND status = 'pending'",
                &[&worker],
            )
            .await?)
    }

    async fn recover(&self, now: Millis) -> Result<u64> {
        // Other instances are alive: only claims whose lease ended are stale.
        let client = self.pool.get().await?;
        Ok(client
            .execute(
                "UPDATE runs SET claimed_by = NULL, claimed_until = NULL
                 WHERE status = 'pending' AND claimed_until IS NOT NULL AND claimed_until < $1",
                &[&now],
            )
            .await?)
    }

    async fn version(&self, hash: &str) -> Result<Option<(String, String)>> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT file, source FROM workflow_versions WHERE hash = $1",
                &[&hash],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT MIN(due_at) FROM runs WHERE status = 'pending' AND claimed_by IS NULL",
            )
            .await?;
        Ok(client.query_one(&stmt, &[]).await?.get(0))
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let client = self.pool.get().await?;
        let limit = i64::from(filter.limit.unwrap_or(50).clamp(1, 1000));
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM runs
             WHERE ($1::TEXT IS NULL OR workflow = $1) AND ($2::TEXT IS NULL OR status = $2) AND ($3::TEXT IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4"
        );
        let rows = client
            .query(
                &sql,
                &[&filter.workflow, &filter.status, &filter.before, &limit],
            )
            .await?;
        Ok(rows.iter().map(summary).collect())
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunDetail>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, version_hash,
                    (SELECT payload FROM events WHERE events.id = runs.event_id),
                    (SELECT source FROM workflow_versions WHERE hash = runs.version_hash),
                    (SELECT file FROM workflow_versions WHERE hash = runs.version_hash)
             FROM runs WHERE id = $1"
        );
        let Some(row) = client.query_opt(&sql, &[&id]).await? else {
            return Ok(None);
        };
        let actions = client
            .query(
                "SELECT idx, action_id, status, attempts, http_status, error, message FROM actions WHERE run_id = $1 ORDER BY idx",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| ActionDetail {
                index: usize::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                id: r.get(1),
                status: r.get(2),
                attempts: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                http_status: r.get::<_, Option<i32>>(4).and_then(|s| u16::try_from(s).ok()),
                error: r.get(5),
                message: r.get(6),
                attempt_log: Vec::new(),
            })
            .collect();
        let attempts = client
            .query(
                "SELECT idx, record FROM attempts WHERE run_id = $1 ORDER BY idx, attempt",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| (usize::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1)))
            .collect();
        super::assemble(
            summary(&row),
            row.get(7),
            row.get(10),
            row.get(9),
            row.get(8),
            actions,
            attempts,
        )
        .map(Some)
    }

    async fn prune(&self, before: Millis) -> Result<u64> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let old = "SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1";
        tx.execute(
            &format!("DELETE FROM attempts WHERE run_id IN ({old})"),
            &[&before],
        )
        .await?;
        tx.execute(
            &format!("DELETE FROM actions WHERE run_id IN ({old})"),
            &[&before],
        )
        .await?;
        let n = tx
            .execute(
                "DELETE FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1",
                &[&before],
            )
            .await?;
        tx.execute(
            "DELETE FROM events WHERE received_at < $1 AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.event_id = events.id)",
            &[&before],
        )
        .await?;
        tx.execute(
            "DELETE FROM schedule_ticks s WHERE tick < $1
               AND tick < (SELECT MAX(tick) FROM schedule_ticks t WHERE t.workflow = s.workflow)",
            &[&before],
        )
        .await?;
        // An ingest inserting a run for a version must not race its deletion: this lock
        // conflicts with ingest's INSERT, so the DELETE below sees every committed run.
        tx.batch_execute("LOCK TABLE workflow_versions IN SHARE ROW EXCLUSIVE MODE")
            .await?;
        tx.execute(
            "DELETE FROM workflow_versions v WHERE NOT EXISTS (SELECT 1 FROM runs WHERE runs.version_hash = v.hash)",
            &[],
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn ping(&self) -> Result {
        let client = self.pool.get().await?;
        client.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    async fn listen(&self, wake: Arc<Notify>) -> Result {
        // The first LISTEN must work (a wrong URL fails start-up); later failures reconnect.
        let first = listen_once(&self.config).await?;
        let config = self.config.clone();
        tokio::spawn(async move {
            let mut session = Some(first);
            loop {
                if let Some((client, mut rx)) = session.take() {
                    while rx.recv().await.is_some() {
                        wake.notify_one();
                    }
                    drop(client);
                    // Work may have arrived while we were not listening.
                    wake.notify_one();
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                match listen_once(&config).await {
                    Ok(s) => {
                        tracing::info!("LISTEN re-established");
                        session = Some(s);
                    }
                    Err(e) => tracing::warn!("cannot LISTEN ({e}); polling until it works again"),
                }
            }
        });
        Ok(())
    }
}

/// One LISTEN connection: the client (kept alive) and a stream of notifications
/// that ends when the connection does.
async fn listen_once(
    config: &tokio_postgres::Config,
) -> Result<(
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<()>,
)> {
    let (client, mut conn) = config.connect(NoTls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => drop(tx.send(())),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!("LISTEN connection: {e}; reconnecting");
                    return;
                }
                None => return,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok((client, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_parameter_is_ours() {
        assert_eq!(
            split_schema("postgres://u@h/db?schema=t1&sslmode=disable"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some("t1".to_owned())
            )
        );
        assert_eq!(
            split_schema("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), None)
        );
    }
}
