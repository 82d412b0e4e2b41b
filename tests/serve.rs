//! `flowrun serve`: in-process on 127.0.0.1:0 with an injected shutdown, and as
//! the real binary for crash tests, against loopback sinks the tests start.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use flowrun::engine::{Engine, SystemClock};
use flowrun::registry::Registry;
use flowrun::secrets::Secrets;
use flowrun::server;
use flowrun::store::Store as _;
use flowrun::store::sqlite::SqliteStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One request the sink received.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    idempotency_key: String,
    body: String,
    headers: HeaderMap,
}

/// A loopback HTTP sink: answers each request with the next scripted status
/// (the last one repeats), after an optional delay, and records what it got.
#[derive(Clone)]
struct Sink {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Sink {
    async fn start(script: Vec<(u16, Duration)>) -> Sink {
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let h = Arc::clone(&hits);
        let script = Arc::new(script);
        let app = Router::new().route(
            "/{*path}",
            post(move |headers: HeaderMap, body: String| {
                let hits = Arc::clone(&h);
                let script = Arc::clone(&script);
                async move {
                    let n = {
                        let mut hits = hits.lock().expect("lock");
                        hits.push(Hit {
                            at: Instant::now(),
                            idempotency_key: headers
                                .get("idempotency-key")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned(),
                            body: body.clone(),
                            headers: headers.clone(),
                        });
                        hits.len()
                    };
                    let (status, delay) = script[(n - 1).min(script.len() - 1)];
                    tokio::time::sleep(delay).await;
                    // Echo what came in, so secrets in requests would show up in responses.
                    let echo = format!("{headers:?} {body}");
                    (StatusCode::from_u16(status).expect("status"), echo)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Sink { addr, hits }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Hit> {
        let deadline = Instant::now() + within;
        loop {
            let hits = self.hits();
            if hits.len() >= n || Instant::now() > deadline {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn workflow(name: &str, event: &str, url: &str, extra: &str) -> String {
    format!(
        "name: {name}\ntrigger:\n  event: {event}\nactions:\n  - id: send\n    http:\n      method: POST\n      url: \"{url}\"\n      json:\n        order: \"{{{{ payload.order }}}}\"\n      retry:\n        initial_backoff: 100ms\n        max_backoff: 2s\n        max_duration: 30s\n{extra}  - log: \"done {{{{ steps.send.status }}}}\"\n"
    )
}

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new(files: &[(&str, String)]) -> Dir {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("workflows")).expect("mkdir");
        for (name, text) in files {
            std::fs::write(tmp.path().join("workflows").join(name), text).expect("write");
        }
        Dir { tmp }
    }
    fn workflows(&self) -> PathBuf {
        self.tmp.path().join("workflows")
    }
    fn db(&self) -> String {
        format!("sqlite://{}", self.tmp.path().join("flowrun.db").display())
    }
}

/// `serve` in-process; stop it with the returned token and await the handle.
async fn start_in_process(
    dir: &Dir,
    max_body: usize,
    secrets: Secrets,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    start_with(dir, max_body, secrets, None).await
}

async fn start_with(
    dir: &Dir,
    max_body: usize,
    secrets: Secrets,
    ingest_token: Option<&str>,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let token = ingest_token.map(str::to_owned);
    start_cfg(dir, secrets, move |c| {
        c.max_body = max_body;
        c.ingest_token = token;
    })
    .await
}

async fn start_cfg(
    dir: &Dir,
    secrets: Secrets,
    adjust: impl FnOnce(&mut server::Config),
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let store = Arc::new(SqliteStore::open_url(&dir.db()).expect("store"));
    let registry = Registry::load(&dir.workflows()).expect("workflows");
    let engine = Engine::new(Arc::new(SystemClock)).expect("engine");
    let mut config = server::Config {
        dir: dir.workflows(),
        max_body: 1 << 20,
        retain: Duration::from_secs(7 * 86_400),
        ingest_token: None,
        workers: flowrun::worker::Config {
            poll: Duration::from_millis(100),
            grace: Duration::from_secs(2),
            ..Default::default()
        },
    };
    adjust(&mut config);
    let token = CancellationToken::new();
    let t = token.clone();
    let handle = tokio::spawn(async move {
        server::serve(listener, store, engine, secrets, registry, config, t)
            .await
            .expect("serve");
    });
    (addr, token, handle)
}

fn client() -> reqwest::Client {
    // One client for the whole test binary: building one loads the TLS roots, which is slow.
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // reqwest is built without a default crypto provider (see Engine::new).
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::new()
        })
        .clone()
}

async fn post_event(addr: SocketAddr, name: &str, body: &str) -> (u16, Value) {
    let resp = client()
        .post(format!("http://{addr}/events/{name}"))
        .body(body.to_owned())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_slice(&resp.bytes().await.expect("body")).unwrap_or(Value::Null),
    )
}

async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let resp = client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("get");
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_slice(&resp.bytes().await.expect("body")).unwrap_or(Value::Null),
    )
}

async fn wait_run(addr: SocketAddr, id: &str, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, run) = get_json(addr, &format!("/runs/{id}")).await;
        if run["status"] == status || Instant::now() > deadline {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_event_runs_every_matching_workflow() {
    let sink = Sink::start(vec![(200, Duration::ZERO)]).await;
    let url = format!("http://{}/hook", sink.addr);
    let dir = Dir::new(&[
        ("a.yaml", workflow("wf-a", "order.paid", &url, "")),
        ("b.yaml", workflow("wf-b", "order.paid", &url, "")),
        ("c.yaml", workflow("wf-c", "order.refunded", &url, "")),
    ]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (status, body) = post_event(addr, "order.paid", r#"{"order": 42}"#).await;
    assert_eq!(status, 202, "{body}");
    let runs = body["runs"].as_array().expect("runs").clone();
    assert_eq!(runs.len(), 2);
    for id in &runs {
        let run = wait_run(
            addr,
            id.as_str().expect("id"),
            "succeeded",
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(run["actions"][0]["attempt_log"][0]["http_status"], 200);
        assert_eq!(run["actions"][1]["message"], "done 200");
    }
    let hits = sink.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h.body == r#"{"order":42}"#), "{hits:?}");

    let (status, body) = post_event(addr, "nothing.matches", "{}").await;
    assert_eq!((status, body["runs"].clone()), (202, json!([])));

    let (_, listed) = get_json(addr, "/runs?workflow=wf-a").await;
    assert_eq!(listed["runs"].as_array().map(Vec::len), Some(1));
    let (status, _) = get_json(addr, "/runs?status=bogus").await;
    assert_eq!(status, 400);
    let (status, body) = get_json(addr, "/runs/nope").await;
    assert_eq!((status, body["error"].as_str().is_some()), (404, true));
    assert_eq!(get_json(addr, "/healthz").await.0, 200);
    assert_eq!(get_json(addr, "/readyz").await.0, 200);
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_store_nothing() {
    let sink = Sink::start(vec![(200, Duration::ZERO)]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let (addr, stop, handle) = start_in_process(&dir, 64, Secrets::default()).await;
    let (status, body) = post_event(addr, "e", "{not json").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().expect("error").contains("not JSON"),
        "{body}"
    );
    let big = format!(r#"{{"order": "{}"}}"#, "x".repeat(100));
    let (status, body) = post_event(addr, "e", &big).await;
    assert_eq!(status, 413);
    assert!(
        body["error"].as_str().expect("error").contains("64 bytes"),
        "{body}"
    );
    let (_, listed) = get_json(addr, "/runs").await;
    assert_eq!(listed["runs"], json!([]));
    assert!(sink.hits().is_empty());
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn secrets_never_appear_in_run_history() {
    let secret = "tok-9f8e7d6c5b4a";
    let sink = Sink::start(vec![(500, Duration::ZERO), (200, Duration::ZERO)]).await;
    let extra = "      headers:\n        Authorization: \"Bearer {{ secrets.TOKEN }}\"\n";
    let dir = Dir::new(&[(
        "a.yaml",
        workflow(
            "wf-a",
            "e",
            &format!("http://{}/x?t={{{{ secrets.TOKEN }}}}", sink.addr),
            extra,
        ),
    )]);
    let mut secrets = Secrets::default();
    secrets.insert("TOKEN", secret);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, secrets).await;
    let (_, body) = post_event(addr, "e", r#"{"order": 1}"#).await;
    let id = body["runs"][0].as_str().expect("run id").to_owned();
    let run = wait_run(addr, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    // The sink saw the secret (so the test could fail) …
    assert!(
        sink.hits()[0].headers["authorization"]
            .to_str()
            .expect("ascii")
            .contains(secret)
    );
    // … and echoed it back in its bodies, but the history shows it redacted.
    let text = run.to_string();
    assert!(!text.contains(secret), "{run:#}");
    assert!(text.contains("[redacted]"), "{run:#}");
    let (_, listed) = get_json(addr, "/runs").await;
    assert!(!listed.to_string().contains(secret));
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn graceful_shutdown_leaves_pending_work_for_the_next_start() {
    // 503 first, then 200: the retry is due ~1s later, after we stop the server.
    let sink = Sink::start(vec![(503, Duration::ZERO), (200, Duration::ZERO)]).await;
    let extra = "";
    let wf = workflow("wf-a", "e", &format!("http://{}/x", sink.addr), extra)
        .replace("initial_backoff: 100ms", "initial_backoff: 1s");
    let dir = Dir::new(&[("a.yaml", wf)]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (_, body) = post_event(addr, "e", r#"{"order": 1}"#).await;
    let id = body["runs"][0].as_str().expect("run id").to_owned();
    assert_eq!(sink.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    stop.cancel();
    handle.await.expect("serve stops");

    let store = SqliteStore::open_url(&dir.db()).expect("store");
    let run = store.get_run(&id).await.expect("read").expect("run exists");
    assert_eq!(run.summary.status, "pending");
    assert!(run.summary.due_at.is_some());
    drop(store);

    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let run = wait_run(addr, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let hits = sink.hits();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].idempotency_key, hits[1].idempotency_key);
    // The retry fired at its due time (≥ the jittered 1s backoff), not before.
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(790),
        "{:?}",
        hits[1].at - hits[0].at
    );
    stop.cancel();
    handle.await.expect("serve stops");
}

// ---- the real binary, for crash tests ----

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Dir) -> Server {
        Server::start_on(dir, &dir.db(), &[])
    }

    fn start_on(dir: &Dir, db: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowrun"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db", db, "--dir"])
            .arg(dir.workflows())
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn flowrun serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve printed its address")
                .expect("utf-8");
            if let Some(rest) = line.split(" on http://").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .expect("addr")
                    .parse()
                    .expect("socket addr");
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("exit").code()
    }
}

impl Drop for Server {
    // A failing test must not leave a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn flowrun_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowrun"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn kill_9_after_202_loses_nothing_and_resends_in_flight_attempts_with_the_same_key() {
    // The first request hangs for 3 s: it is in flight when the server is killed.
    let sink = Sink::start(vec![(200, Duration::from_secs(3)), (200, Duration::ZERO)]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let server = Server::start(&dir);
    let (status, body) = post_event(server.addr, "e", r#"{"order": 7}"#).await;
    assert_eq!(status, 202);
    let id = body["runs"][0].as_str().expect("run id").to_owned();
    assert_eq!(
        sink.wait_for(1, Duration::from_secs(5)).await.len(),
        1,
        "the attempt is in flight"
    );
    server.kill9();

    let server = Server::start(&dir);
    let run = wait_run(server.addr, &id, "succeeded", Duration::from_secs(15)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let hits = sink.hits();
    assert_eq!(hits.len(), 2, "sent once before the crash and once after");
    assert_eq!(
        hits[0].idempotency_key, hits[1].idempotency_key,
        "same delivery id across the crash"
    );
    assert_eq!(hits[1].body, r#"{"order":7}"#);

    // The CLI twins read the same database.
    assert_eq!(server.terminate(), Some(0), "SIGTERM exits 0");
    let (code, out) = flowrun_cli(&["runs", "list", "--db", &dir.db()]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("succeeded"), "{out}");
    let (code, out) = flowrun_cli(&["runs", "show", &id, "--db", &dir.db()]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["actions"][0]["status"], "succeeded");
}

#[tokio::test]
async fn kill_9_right_after_202_then_restart_completes_the_run() {
    let sink = Sink::start(vec![(200, Duration::ZERO)]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let server = Server::start(&dir);
    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, body) = post_event(server.addr, "e", &format!(r#"{{"order": {i}}}"#)).await;
        assert_eq!(status, 202);
        ids.push(body["runs"][0].as_str().expect("id").to_owned());
    }
    server.kill9();
    let server = Server::start(&dir);
    for id in &ids {
        let run = wait_run(server.addr, id, "succeeded", Duration::from_secs(15)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    let mut orders: Vec<String> = sink.hits().iter().map(|h| h.body.clone()).collect();
    orders.sort();
    orders.dedup();
    assert_eq!(orders.len(), 20, "every accepted event was delivered");
    server.kill9();
}

#[tokio::test]
async fn a_pending_retry_survives_a_crash_and_fires_at_its_due_time() {
    let sink = Sink::start(vec![(503, Duration::ZERO), (200, Duration::ZERO)]).await;
    let wf = workflow("wf-a", "e", &format!("http://{}/x", sink.addr), "")
        .replace("initial_backoff: 100ms", "initial_backoff: 2s");
    let dir = Dir::new(&[("a.yaml", wf)]);
    let server = Server::start(&dir);
    let (_, body) = post_event(server.addr, "e", r#"{"order": 1}"#).await;
    let id = body["runs"][0].as_str().expect("run id").to_owned();
    assert_eq!(sink.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    // Let the 503 be recorded with its due time, then crash.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, run) = get_json(server.addr, &format!("/runs/{id}")).await;
        if run["actions"][0]["attempt_log"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    let server = Server::start(&dir);
    let run = wait_run(server.addr, &id, "succeeded", Duration::from_secs(15)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let hits = sink.hits();
    assert_eq!(hits.len(), 2);
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(1590),
        "fired before its due time: {gap:?}"
    );
    assert_eq!(run["actions"][0]["attempts"], 2);
    server.kill9();
}

// ---- live operations: reload, schedules, auth, payload checks, metrics ----

async fn workflows_view(addr: SocketAddr) -> Vec<Value> {
    get_json(addr, "/workflows").await.1["workflows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn wait_view(
    addr: SocketAddr,
    within: Duration,
    ok: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let view = workflows_view(addr).await;
        if ok(&view) || Instant::now() > deadline {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn named<'a>(view: &'a [Value], name: &str) -> Option<&'a Value> {
    view.iter().find(|w| w["name"] == name)
}

async fn metric(addr: SocketAddr, name: &str, label: Option<(&str, &str)>) -> f64 {
    let text = client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn log_workflow(name: &str, event: &str, message: &str) -> String {
    format!("name: {name}\ntrigger:\n  event: {event}\nactions:\n  - log: \"{message}\"\n")
}

#[tokio::test]
async fn reload_picks_up_new_changed_broken_renamed_and_deleted_files() {
    let dir = Dir::new(&[("a.yaml", log_workflow("wf-a", "e", "v1"))]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let v1 = named(&workflows_view(addr).await, "wf-a").expect("loaded")["version"].clone();

    // New file.
    std::fs::write(
        dir.workflows().join("b.yaml"),
        log_workflow("wf-b", "other", "b"),
    )
    .expect("write");
    let view = wait_view(addr, Duration::from_secs(5), |v| named(v, "wf-b").is_some()).await;
    assert!(named(&view, "wf-b").is_some(), "{view:?}");

    // Changed (valid): the next event runs the new version.
    std::fs::write(
        dir.workflows().join("a.yaml"),
        log_workflow("wf-a", "e", "v2"),
    )
    .expect("write");
    let view = wait_view(addr, Duration::from_secs(5), |v| {
        named(v, "wf-a").is_some_and(|w| w["version"] != v1)
    })
    .await;
    let v2 = named(&view, "wf-a").expect("a")["version"].clone();
    assert_ne!(v1, v2);
    let (_, body) = post_event(addr, "e", "{}").await;
    let run = wait_run(
        addr,
        body["runs"][0].as_str().expect("run"),
        "succeeded",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        (run["version"].clone(), run["actions"][0]["message"].clone()),
        (v2.clone(), json!("v2"))
    );

    // Broken: the last good version keeps running, the error shows.
    std::fs::write(dir.workflows().join("a.yaml"), "name: wf-a\ntrigger: [\n").expect("write");
    let view = wait_view(addr, Duration::from_secs(5), |v| {
        named(v, "wf-a").is_some_and(|w| !w["error"].is_null())
    })
    .await;
    let a = named(&view, "wf-a").expect("still there");
    assert_eq!(a["version"], v2);
    assert!(
        a["error"].as_str().expect("error").contains("a.yaml:"),
        "{a}"
    );
    assert_eq!(
        metric(addr, "flowrun_workflow_load_errors", None).await,
        1.0
    );
    let (_, body) = post_event(addr, "e", "{}").await;
    let run = wait_run(
        addr,
        body["runs"][0].as_str().expect("run"),
        "succeeded",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(run["actions"][0]["message"], "v2");

    // Renamed (and fixed): same name, new file.
    std::fs::remove_file(dir.workflows().join("a.yaml")).expect("rm");
    std::fs::write(
        dir.workflows().join("a2.yaml"),
        log_workflow("wf-a", "e", "v3"),
    )
    .expect("write");
    let view = wait_view(addr, Duration::from_secs(5), |v| {
        named(v, "wf-a").is_some_and(|w| w["file"].as_str().is_some_and(|f| f.ends_with("a2.yaml")))
    })
    .await;
    assert!(
        named(&view, "wf-a").is_some_and(|w| w["error"].is_null()),
        "{view:?}"
    );

    // Deleted: no new runs.
    std::fs::remove_file(dir.workflows().join("a2.yaml")).expect("rm");
    let view = wait_view(addr, Duration::from_secs(5), |v| named(v, "wf-a").is_none()).await;
    assert!(named(&view, "wf-a").is_none(), "{view:?}");
    let (status, body) = post_event(addr, "e", "{}").await;
    assert_eq!((status, body["runs"].clone()), (202, json!([])));
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn a_second_file_claiming_a_name_is_reported_and_the_first_keeps_it() {
    let dir = Dir::new(&[("z.yaml", log_workflow("same", "e", "first"))]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    // a.yaml sorts first, but z.yaml had the name.
    std::fs::write(
        dir.workflows().join("a.yaml"),
        log_workflow("same", "e", "second"),
    )
    .expect("write");
    let view = wait_view(addr, Duration::from_secs(5), |v| {
        v.iter().any(|w| w["name"].is_null())
    })
    .await;
    let owner = named(&view, "same").expect("kept");
    assert!(
        owner["file"].as_str().expect("file").ends_with("z.yaml"),
        "{view:?}"
    );
    let loser = view
        .iter()
        .find(|w| w["name"].is_null())
        .unwrap_or_else(|| panic!("reported: {view:?}"));
    assert!(
        loser["error"]
            .as_str()
            .expect("error")
            .contains("already used"),
        "{loser}"
    );
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn a_burst_of_50_writes_gives_one_reload() {
    let dir = Dir::new(&[("a.yaml", log_workflow("wf-a", "e", "x"))]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let before = metric(addr, "flowrun_reloads_total", None).await;
    for i in 0..50 {
        std::fs::write(
            dir.workflows().join(format!("burst-{i:02}.yaml")),
            log_workflow(&format!("burst-{i:02}"), "e", "b"),
        )
        .expect("write");
    }
    let view = wait_view(addr, Duration::from_secs(5), |v| v.len() == 51).await;
    assert_eq!(view.len(), 51);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(addr, "flowrun_reloads_total", None).await - before,
        1.0
    );
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn a_schedule_tick_fires_once_also_across_restarts() {
    let dir = Dir::new(&[(
        "s.yaml",
        "name: nightly\ntrigger:\n  schedule: \"0 2 * * *\"\nactions:\n  - log: \"at {{ payload.scheduled_at }} ({{ trigger.schedule }})\"\n".to_owned(),
    )]);
    let registry = Registry::load(&dir.workflows()).expect("load");
    let loaded = Arc::clone(&registry.schedules[0]);
    // An injected clock: the tick is computed from a fixed time, not from now.
    let cron = flowrun::schedule::parse("0 2 * * *").expect("cron");
    let t0 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let tick = flowrun::schedule::next_tick(&cron, t0).expect("tick");
    assert_eq!(tick, t0 + 2 * 3_600_000);
    {
        let store = SqliteStore::open_url(&dir.db()).expect("store");
        assert!(
            flowrun::scheduler::fire(&store, &loaded, tick)
                .await
                .expect("fire")
        );
        assert!(
            !flowrun::scheduler::fire(&store, &loaded, tick)
                .await
                .expect("fire again")
        );
    }
    let store = SqliteStore::open_url(&dir.db()).expect("reopened");
    assert!(
        !flowrun::scheduler::fire(&store, &loaded, tick)
            .await
            .expect("after restart"),
        "a tick fires once"
    );
    assert_eq!(
        store.last_ticks().await.expect("ticks"),
        vec![("nightly".to_owned(), tick)]
    );
    // Ticks missed while down are counted (and logged), not replayed: 3 days later, 3 ticks were missed.
    assert_eq!(
        flowrun::schedule::ticks_between(&cron, tick, tick + 3 * 86_400_000, 100),
        3
    );
    drop(store);

    // The fired tick's run completes with the schedule payload.
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (_, listed) = get_json(addr, "/runs?workflow=nightly").await;
    let id = listed["runs"][0]["id"]
        .as_str()
        .expect("one run")
        .to_owned();
    let run = wait_run(addr, &id, "succeeded", Duration::from_secs(5)).await;
    assert_eq!(
        run["payload"],
        json!({"scheduled_at": "2026-01-01T02:00:00.000Z"})
    );
    assert_eq!(
        run["actions"][0]["message"],
        "at 2026-01-01T02:00:00.000Z (0 2 * * *)"
    );
    assert_eq!(listed["runs"].as_array().map(Vec::len), Some(1));
    stop.cancel();
    handle.await.expect("serve stops");
}

async fn post_with(
    addr: SocketAddr,
    name: &str,
    body: &str,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut req = client()
        .post(format!("http://{addr}/events/{name}"))
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("post");
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_slice(&resp.bytes().await.expect("body")).unwrap_or(Value::Null),
    )
}

async fn stored_runs(addr: SocketAddr) -> usize {
    get_json(addr, "/runs").await.1["runs"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test]
async fn ingest_token_is_required_when_set() {
    let dir = Dir::new(&[("a.yaml", log_workflow("wf-a", "e", "x"))]);
    let (addr, stop, handle) =
        start_with(&dir, 1 << 20, Secrets::default(), Some("t0ken-123")).await;
    assert_eq!(post_with(addr, "e", "{}", &[]).await.0, 401);
    assert_eq!(
        post_with(addr, "e", "{}", &[("authorization", "Bearer wrong".into())])
            .await
            .0,
        401
    );
    assert_eq!(stored_runs(addr).await, 0);
    assert_eq!(
        post_with(
            addr,
            "e",
            "{}",
            &[("authorization", "Bearer t0ken-123".into())]
        )
        .await
        .0,
        202
    );
    assert_eq!(
        metric(
            addr,
            "flowrun_events_rejected_total",
            Some(("reason", "unauthorized"))
        )
        .await,
        2.0
    );
    stop.cancel();
    handle.await.expect("serve stops");
}

fn hmac_b64(key: &[u8], msg: &[u8]) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
    mac.update(msg);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn shopify_signatures_are_checked_before_anything_is_stored() {
    let wf = "name: shop\ntrigger:\n  event: orders.paid\n  verify:\n    scheme: shopify\n    secret: \"{{ secrets.SHOP }}\"\nactions:\n  - log: ok\n";
    let dir = Dir::new(&[("a.yaml", wf.to_owned())]);
    let mut secrets = Secrets::default();
    secrets.insert("SHOP", "shpss_secret");
    let (addr, stop, handle) = start_with(&dir, 1 << 20, secrets, None).await;
    let body = r#"{"id": 1}"#;
    let good = hmac_b64(b"shpss_secret", body.as_bytes());
    let bad = hmac_b64(b"other", body.as_bytes());
    assert_eq!(
        post_with(addr, "orders.paid", body, &[]).await.0,
        401,
        "missing"
    );
    assert_eq!(
        post_with(addr, "orders.paid", body, &[("x-shopify-hmac-sha256", bad)])
            .await
            .0,
        401,
        "wrong"
    );
    assert_eq!(
        post_with(
            addr,
            "orders.paid",
            r#"{"id": 2}"#,
            &[("x-shopify-hmac-sha256", good.clone())]
        )
        .await
        .0,
        401,
        "signature of another body"
    );
    assert_eq!(stored_runs(addr).await, 0);
    assert_eq!(
        post_with(
            addr,
            "orders.paid",
            body,
            &[("x-shopify-hmac-sha256", good)]
        )
        .await
        .0,
        202
    );
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn standard_webhooks_signatures_are_checked_with_a_5_minute_window() {
    use base64::Engine as _;
    let key_bytes = b"0123456789abcdef0123456789abcdef";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key_bytes)
    );
    let wf = "name: sw\ntrigger:\n  event: sw.e\n  verify:\n    scheme: standard-webhooks\n    secret: \"{{ secrets.SW }}\"\nactions:\n  - log: ok\n";
    let dir = Dir::new(&[("a.yaml", wf.to_owned())]);
    let mut secrets = Secrets::default();
    secrets.insert("SW", secret);
    let (addr, stop, handle) = start_with(&dir, 1 << 20, secrets, None).await;
    let body = r#"{"type": "ping"}"#;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let sign = |id: &str, ts: u64| {
        format!(
            "v1,{}",
            hmac_b64(key_bytes, format!("{id}.{ts}.{body}").as_bytes())
        )
    };
    let headers = |id: &str, ts: u64, sig: String| {
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ]
    };

    assert_eq!(post_with(addr, "sw.e", body, &[]).await.0, 401, "missing");
    assert_eq!(
        post_with(addr, "sw.e", body, &headers("msg_1", now, "v1,AAAA".into()))
            .await
            .0,
        401,
        "wrong"
    );
    let old = now - 301;
    assert_eq!(
        post_with(
            addr,
            "sw.e",
            body,
            &headers("msg_1", old, sign("msg_1", old))
        )
        .await
        .0,
        401,
        "expired"
    );
    assert_eq!(stored_runs(addr).await, 0);
    // Several signatures (key rotation): one valid is enough.
    let both = format!("v1,bm9wZQ== {}", sign("msg_2", now));
    assert_eq!(
        post_with(addr, "sw.e", body, &headers("msg_2", now, both))
            .await
            .0,
        202
    );
    assert_eq!(stored_runs(addr).await, 1);
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn payloads_that_break_payload_schema_get_422_with_every_violation() {
    let wf = "name: typed\ntrigger:\n  event: t\n  payload_schema:\n    type: object\n    required: [order]\n    properties:\n      order:\n        type: object\n        required: [id]\n        properties:\n          id: {type: integer}\nactions:\n  - log: \"{{ payload.order.id }}\"\n";
    let dir = Dir::new(&[("a.yaml", wf.to_owned())]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (status, body) = post_event(addr, "t", r#"{"order": {"id": "seven"}}"#).await;
    assert_eq!(status, 422, "{body}");
    let v = &body["violations"][0];
    assert_eq!(
        (v["workflow"].clone(), v["pointer"].clone()),
        (json!("typed"), json!("/order/id"))
    );
    assert!(
        v["message"].as_str().expect("message").contains("integer"),
        "{v}"
    );
    let (status, body) = post_event(addr, "t", "{}").await;
    assert_eq!(status, 422);
    assert_eq!(body["violations"][0]["pointer"], "");
    assert_eq!(stored_runs(addr).await, 0);
    assert_eq!(
        post_event(addr, "t", r#"{"order": {"id": 7}}"#).await.0,
        202
    );
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn metrics_scrape_parses_as_prometheus_text() {
    let sink = Sink::start(vec![(503, Duration::ZERO), (200, Duration::ZERO)]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (_, body) = post_event(addr, "e", r#"{"order": 1}"#).await;
    wait_run(
        addr,
        body["runs"][0].as_str().expect("run"),
        "succeeded",
        Duration::from_secs(10),
    )
    .await;
    post_event(addr, "e", "not json").await;
    assert_eq!(
        metric(addr, "flowrun_events_accepted_total", None).await,
        1.0
    );
    assert_eq!(
        metric(
            addr,
            "flowrun_events_rejected_total",
            Some(("reason", "not_json"))
        )
        .await,
        1.0
    );
    assert_eq!(metric(addr, "flowrun_runs_started_total", None).await, 1.0);
    assert_eq!(
        metric(
            addr,
            "flowrun_runs_finished_total",
            Some(("status", "succeeded"))
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(addr, "flowrun_attempts_total", Some(("class", "5xx"))).await,
        1.0
    );
    assert_eq!(
        metric(addr, "flowrun_attempts_total", Some(("class", "2xx"))).await,
        1.0
    );
    assert_eq!(metric(addr, "flowrun_retry_queue_depth", None).await, 0.0);
    assert_eq!(metric(addr, "flowrun_workflows_loaded", None).await, 1.0);
    assert!(metric(addr, "flowrun_http_action_duration_seconds_count", None).await >= 0.0);
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn while_draining_ingest_answers_503_and_in_flight_attempts_finish() {
    let sink = Sink::start(vec![(200, Duration::from_millis(800))]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (_, body) = post_event(addr, "e", r#"{"order": 1}"#).await;
    let id = body["runs"][0].as_str().expect("run").to_owned();
    assert_eq!(
        sink.wait_for(1, Duration::from_secs(5)).await.len(),
        1,
        "in flight"
    );
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = post_event(addr, "e", r#"{"order": 2}"#).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(get_json(addr, "/readyz").await.0, 503);
    handle.await.expect("serve stops");
    let store = SqliteStore::open_url(&dir.db()).expect("store");
    let run = store.get_run(&id).await.expect("read").expect("run");
    // The in-flight attempt finished within the grace period and was recorded; the
    // next action was not started: it stays pending for the next start.
    assert_eq!(run.actions[0].status, "succeeded", "{run:?}");
    assert_eq!(
        (run.summary.status.as_str(), run.actions[1].status.as_str()),
        ("pending", "pending")
    );
    assert_eq!(
        store
            .list_runs(&Default::default())
            .await
            .expect("list")
            .len(),
        1,
        "nothing stored while draining"
    );
}

#[tokio::test]
async fn a_long_attempt_renews_its_claim_and_is_sent_once() {
    // The attempt takes 5 leases; without renewal the run would be claimed again and sent twice.
    let sink = Sink::start(vec![(200, Duration::from_millis(500))]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let (addr, stop, handle) = start_cfg(&dir, Secrets::default(), |c| {
        c.workers.lease = Duration::from_millis(100);
        c.workers.poll = Duration::from_millis(20);
    })
    .await;
    let (_, body) = post_event(addr, "e", r#"{"order": 1}"#).await;
    let run = wait_run(
        addr,
        body["runs"][0].as_str().expect("run"),
        "succeeded",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(run["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.hits().len(), 1, "sent exactly once");
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn query_and_routing_errors_are_json() {
    let dir = Dir::new(&[("a.yaml", log_workflow("wf-a", "e", "x"))]);
    let (addr, stop, handle) = start_in_process(&dir, 1 << 20, Secrets::default()).await;
    let (status, body) = get_json(addr, "/runs?limit=abc").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().expect("error").contains("`limit`"),
        "{body}"
    );
    let (status, body) = get_json(addr, "/runs?workflow=&status=&limit=&before=").await;
    assert_eq!((status, body["runs"].clone()), (200, json!([])));
    let (status, body) = get_json(addr, "/nope").await;
    assert_eq!((status, body["error"].is_string()), (404, true));
    let (status, body) = get_json(addr, "/events/e").await;
    assert_eq!((status, body["error"].is_string()), (405, true));
    stop.cancel();
    handle.await.expect("serve stops");
}

#[tokio::test]
async fn a_second_serve_on_the_same_sqlite_file_is_refused() {
    let dir = Dir::new(&[("a.yaml", log_workflow("wf-a", "e", "x"))]);
    let first = Server::start(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_flowrun"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &dir.db(),
            "--dir",
        ])
        .arg(dir.workflows())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another flowrun serve is using"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    first.kill9();
}

#[tokio::test]
async fn two_instances_on_postgres_share_the_work_and_survive_a_kill_9() {
    let Ok(base) = std::env::var("FLOWRUN_TEST_POSTGRES_URL") else {
        println!(
            "skipped two_instances_on_postgres_share_the_work_and_survive_a_kill_9: FLOWRUN_TEST_POSTGRES_URL is not set"
        );
        return;
    };
    let schema = format!("t_{}", flowrun::engine::new_id().replace('-', ""));
    let db = format!(
        "{base}{}schema={schema}",
        if base.contains('?') { '&' } else { '?' }
    );
    // Each delivery takes 200 ms: 64 workers deliver ~320/s, slower than events arrive,
    // so hundreds are still queued or in flight at the kill.
    let sink = Sink::start(vec![(200, Duration::from_millis(200))]).await;
    let dir = Dir::new(&[(
        "a.yaml",
        workflow("wf-a", "e", &format!("http://{}/x", sink.addr), ""),
    )]);
    let extra = ["--lease", "2s", "--workers", "32"];
    let a = Server::start_on(&dir, &db, &extra);
    let b = Server::start_on(&dir, &db, &extra);
    let (a_addr, b_addr) = (a.addr, b.addr);
    let total = 1000;
    let started = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for chunk in 0..20 {
        posts.spawn(async move {
            for i in 0..total / 20 {
                let n = chunk * (total / 20) + i;
                let addr = if n % 2 == 0 { a_addr } else { b_addr };
                let (status, _) = post_event(addr, "e", &format!(r#"{{"order": {n}}}"#)).await;
                assert_eq!(status, 202);
            }
        });
    }
    while let Some(r) = posts.join_next().await {
        r.expect("all 1000 events accepted");
    }
    let before_kill = sink.hits().len();
    let accepted_in = started.elapsed();
    let a_attempts = metric(a_addr, "flowrun_attempts_total", None).await;
    let b_attempts = metric(b_addr, "flowrun_attempts_total", None).await;
    println!("before the kill: instance A finished {a_attempts} attempts, B {b_attempts}");
    a.kill9();
    // B takes over A's claims once their 2 s lease ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, pending) = get_json(b_addr, "/runs?status=pending&limit=1").await;
        if pending["runs"] == json!([]) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = sink.hits();
    let mut orders: Vec<String> = hits.iter().map(|h| h.body.clone()).collect();
    orders.sort();
    orders.dedup();
    let duplicates = hits.len() - orders.len();
    println!(
        "two instances: {total} events accepted in {accepted_in:?}; kill -9 of one after {before_kill} deliveries; all runs done {:?} later: {} deliveries, {duplicates} duplicates",
        started.elapsed() - accepted_in,
        hits.len()
    );
    assert_eq!(orders.len(), total, "every accepted event's run completed");
    // Only attempts in flight at the kill are sent twice: at most A's 32 workers.
    assert!(duplicates <= 32, "{duplicates} duplicates");
    let (_, pending) = get_json(b_addr, "/runs?status=pending&limit=1").await;
    assert_eq!(pending["runs"], json!([]));
    // The history CLI reads the shared database too.
    let (code, out) = flowrun_cli(&[
        "runs",
        "list",
        "--db",
        &db,
        "--status",
        "succeeded",
        "--limit",
        "1000",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), total, "{out}");
    b.kill9();
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop the test schema");
}

#[tokio::test]
async fn sighup_forces_a_full_reload() {
    let dir = Dir::new(&[("a.yaml", log_workflow("wf-a", "e", "x"))]);
    let server = Server::start(&dir);
    let before = metric(server.addr, "flowrun_reloads_total", None).await;
    let pid = server.child.id().to_string();
    Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(server.addr, "flowrun_reloads_total", None).await == before
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(server.addr, "flowrun_reloads_total", None).await,
        before + 1.0
    );
    assert_eq!(server.terminate(), Some(0));
}
