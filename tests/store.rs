//! The store's behaviour, run against both backends from one suite: SQLite in a
//! temp dir, and PostgreSQL (each test in its own schema) when
//! `FLOWRUN_TEST_POSTGRES_URL` is set; otherwise the PostgreSQL half is skipped
//! with a printed notice.

use std::sync::Arc;

use flowrun::engine::{ActionReport, ActionStatus};
use flowrun::registry::Registry;
use flowrun::store::postgres::PgStore;
use flowrun::store::sqlite::SqliteStore;
use flowrun::store::{Millis, NewEvent, NewRun, NextState, RunFilter, StepRecord, Store, Version};
use serde_json::json;

fn version() -> Version {
    let source =
        "name: wf\ntrigger:\n  event: e\nactions:\n  - id: a\n    log: one\n  - log: two\n"
            .to_owned();
    Version {
        hash: flowrun::workflow::version_hash(&source),
        name: "wf".into(),
        file: "wf.yaml".into(),
        source,
    }
}

fn event(n: u32, at: Millis) -> (NewEvent, String) {
    let run = NewRun {
        id: flowrun::engine::new_id(),
        version: version(),
        trigger: json!({"event": "e"}),
        delivery_id: format!("d-{n}"),
    };
    let id = run.id.clone();
    let ev = NewEvent {
        id: flowrun::engine::new_id(),
        name: "e".into(),
        payload: json!({"n": n}),
        received_at: at,
        runs: vec![run],
        tick: None,
    };
    (ev, id)
}

fn report(status: ActionStatus) -> ActionReport {
    flowrun::engine::blank(Some("a".into()), status)
}

const T0: Millis = 1_800_000_000_000;

async fn claims_are_exclusive_and_steps_recorded<S: Store>(s: &S) {
    let (ev, run) = event(1, T0);
    assert!(s.ingest(ev).await.expect("ingest"));
    let got = s.claim("w1", T0, T0 + 1000, 10).await.expect("claim");
    assert_eq!(got.len(), 1);
    assert_eq!(
        (
            got[0].id.clone(),
            got[0].delivery_id.clone(),
            got[0].payload.clone()
        ),
        (run.clone(), "d-1".into(), json!({"n": 1}))
    );
    assert!(
        s.claim("w2", T0, T0 + 1000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "claimed work is not handed out twice"
    );
    let step = |next, action, report| StepRecord {
        run_id: run.clone(),
        action,
        attempt: None,
        report: Some(report),
        next,
        at: T0 + 10,
        lease_until: T0 + 1000,
        worker: "w1".to_owned(),
    };
    s.record(step(
        NextState::Advance {
            next_action: 1,
            delivery_id: "d-1b".into(),
            steps: serde_json::Map::new(),
        },
        0,
        report(ActionStatus::Succeeded),
    ))
    .await
    .expect("record");
    s.record(step(
        NextState::Finished {
            status: "failed",
            not_run: vec![],
        },
        1,
        report(ActionStatus::Failed),
    ))
    .await
    .expect("record");
    let detail = s.get_run(&run).await.expect("get").expect("exists");
    assert_eq!(detail.summary.status, "failed");
    assert_eq!(
        detail
            .actions
            .iter()
            .map(|a| a.status.as_str())
            .collect::<Vec<_>>(),
        ["succeeded", "failed"]
    );
    assert!(
        s.claim("w2", T0 + 5000, T0 + 6000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "finished runs are never claimed"
    );
}

async fn an_ended_lease_is_taken_over_and_renewal_keeps_it<S: Store>(s: &S) {
    let (ev, run) = event(2, T0);
    s.ingest(ev).await.expect("ingest");
    assert_eq!(
        s.claim("dead", T0, T0 + 1000, 10)
            .await
            .expect("claim")
            .len(),
        1
    );
    assert!(
        s.renew(&run, "dead", T0 + 2000).await.expect("renew"),
        "the owner renews"
    );
    assert!(
        !s.renew(&run, "other", T0 + 9000).await.expect("renew"),
        "a non-owner cannot"
    );
    assert!(
        s.claim("w2", T0 + 1500, T0 + 3000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "renewed: not yet"
    );
    let taken = s
        .claim("w2", T0 + 2001, T0 + 3000, 10)
        .await
        .expect("claim");
    assert_eq!(
        taken.len(),
        1,
        "after the lease ends another worker takes it over"
    );
    assert_eq!(taken[0].delivery_id, "d-2", "with the same delivery id");
    assert!(
        !s.renew(&run, "dead", T0 + 9000).await.expect("renew"),
        "the old owner lost it"
    );
    // Fencing: the old owner's late record is refused and changes nothing.
    let late = StepRecord {
        run_id: run.clone(),
        action: 0,
        attempt: None,
        report: Some(report(ActionStatus::Succeeded)),
        next: NextState::Advance {
            next_action: 1,
            delivery_id: "d-late".into(),
            steps: serde_json::Map::new(),
        },
        at: T0 + 2500,
        lease_until: T0 + 9000,
        worker: "dead".to_owned(),
    };
    assert!(matches!(
        s.record(late.clone()).await,
        Err(flowrun::store::Error::LostClaim)
    ));
    let detail = s.get_run(&run).await.expect("get").expect("run");
    assert_eq!(
        detail.actions[0].status, "pending",
        "nothing of the late record was kept"
    );
    // The new owner records normally.
    s.record(StepRecord {
        worker: "w2".to_owned(),
        ..late
    })
    .await
    .expect("owner records");
    assert_eq!(
        s.get_run(&run).await.expect("get").expect("run").actions[0].status,
        "succeeded"
    );
}

async fn a_retry_is_due_only_at_its_time<S: Store>(s: &S) {
    let (ev, run) = event(3, T0);
    s.ingest(ev).await.expect("ingest");
    s.claim("w", T0, T0 + 1000, 10).await.expect("claim");
    s.record(StepRecord {
        run_id: run.clone(),
        action: 0,
        attempt: None,
        report: None,
        next: NextState::Retry {
            attempt: 2,
            due_at: T0 + 60_000,
            first_attempt_at: T0,
        },
        at: T0,
        lease_until: 0,
        worker: "w".to_owned(),
    })
    .await
    .expect("record");
    assert_eq!(s.next_due().await.expect("due"), Some(T0 + 60_000));
    assert_eq!(s.queue_depth().await.expect("depth"), (1, 1));
    assert!(
        s.claim("w", T0 + 59_999, T0 + 70_000, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    let got = s
        .claim("w", T0 + 60_000, T0 + 70_000, 10)
        .await
        .expect("claim");
    assert_eq!(
        (got.len(), got[0].attempt, got[0].first_attempt_at),
        (1, 2, Some(T0))
    );
}

async fn a_tick_is_stored_once<S: Store>(a: &S, b: &S) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: tick\ntrigger:\n  schedule: \"* * * * *\"\nactions:\n  - log: t\n",
    )
    .expect("write");
    let registry = Registry::load(dir.path()).expect("load");
    let loaded = Arc::clone(&registry.schedules[0]);
    // Two instances fire the same tick at once: exactly one stores it.
    let (x, y) = tokio::join!(
        flowrun::scheduler::fire(a, &loaded, T0),
        flowrun::scheduler::fire(b, &loaded, T0)
    );
    let fired = [x.expect("fire"), y.expect("fire")];
    assert_eq!(fired.iter().filter(|f| **f).count(), 1, "{fired:?}");
    assert_eq!(
        a.last_ticks().await.expect("ticks"),
        vec![("tick".to_owned(), T0)]
    );
    let runs = a
        .list_runs(&RunFilter {
            workflow: Some("tick".into()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(runs.len(), 1);
}

async fn history_lists_newest_first_and_prunes<S: Store>(s: &S) {
    let mut ids = Vec::new();
    for n in 10..13 {
        let (ev, run) = event(n, T0 + Millis::from(n));
        s.ingest(ev).await.expect("ingest");
        ids.push(run);
    }
    let listed: Vec<String> = s
        .list_runs(&RunFilter::default())
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, ids.iter().rev().cloned().collect::<Vec<_>>());
    let page = s
        .list_runs(&RunFilter {
            before: Some(ids[2].clone()),
            limit: Some(1),
            ..Default::default()
        })
        .await
        .expect("page");
    assert_eq!(page[0].id, ids[1]);
    // Finish one long ago; prune removes only it.
    s.claim("w", T0 + 100, T0 + 1000, 1).await.expect("claim");
    s.record(StepRecord {
        run_id: ids[0].clone(),
        action: 0,
        attempt: None,
        report: Some(report(ActionStatus::Succeeded)),
        next: NextState::Finished {
            status: "succeeded",
            not_run: vec![],
        },
        at: T0 + 200,
        lease_until: 0,
        worker: "w".to_owned(),
    })
    .await
    .expect("record");
    assert_eq!(s.prune(T0 + 300).await.expect("prune"), 1);
    assert!(s.get_run(&ids[0]).await.expect("get").is_none());
    assert_eq!(
        s.list_runs(&RunFilter::default())
            .await
            .expect("list")
            .len(),
        2
    );
}

// ---- backends ----

fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
    (dir, store)
}

/// A store in a fresh schema, or `None` (with a notice) when no PostgreSQL is configured.
async fn postgres(test: &str) -> Option<(String, PgStore)> {
    let Ok(url) = std::env::var("FLOWRUN_TEST_POSTGRES_URL") else {
        println!("skipped {test} on PostgreSQL: FLOWRUN_TEST_POSTGRES_URL is not set");
        return None;
    };
    let schema = format!("t_{}", uuid_simple());
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}schema={schema}");
    Some((
        url.clone(),
        PgStore::connect(&url, 4)
            .await
            .expect("PostgreSQL from FLOWRUN_TEST_POSTGRES_URL"),
    ))
}

/// Drops the schema a passing test used (a failing one leaves it for inspection).
async fn drop_schema(url: &str) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let Some(schema) = query.split('&').find_map(|kv| kv.strip_prefix("schema=")) else {
        return;
    };
    if let Ok((client, conn)) = tokio_postgres::connect(base, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .expect("drop the test schema");
    }
}

fn uuid_simple() -> String {
    flowrun::engine::new_id().replace('-', "")
}

macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let (_dir, s) = super::sqlite();
                super::$body(&s).await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some((url, s)) = super::postgres(stringify!($name)).await {
                    super::$body(&s).await;
                    super::drop_schema(&url).await;
                }
            }
        }
    };
}

both!(
    claims_are_exclusive,
    claims_are_exclusive_and_steps_recorded
);
both!(leases, an_ended_lease_is_taken_over_and_renewal_keeps_it);
both!(retries, a_retry_is_due_only_at_its_time);
both!(history, history_lists_newest_first_and_prunes);

#[tokio::test]
async fn ticks_sqlite() {
    let (_dir, s) = sqlite();
    a_tick_is_stored_once(&s, &s).await;
}

#[tokio::test]
async fn ticks_postgres_two_instances() {
    if let Some((url, a)) = postgres("ticks_postgres_two_instances").await {
        let b = PgStore::connect(&url, 4).await.expect("second instance");
        a_tick_is_stored_once(&a, &b).await;
        drop_schema(&url).await;
    }
}
