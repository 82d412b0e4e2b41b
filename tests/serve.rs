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
use flowrun::secrets::Secrets;
use flowrun::server::{self, Registry};
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let store = Arc::new(SqliteStore::open_url(&dir.db()).expect("store"));
    let registry = Registry::load(&dir.workflows()).expect("workflows");
    assert!(registry.errors.is_empty(), "{:?}", registry.errors);
    let engine = Engine::new(Arc::new(SystemClock)).expect("engine");
    let config = server::Config {
        dir: dir.workflows(),
        max_body,
        retain: Duration::from_secs(7 * 86_400),
        workers: flowrun::worker::Config {
            poll: Duration::from_millis(100),
            grace: Duration::from_secs(2),
            ..Default::default()
        },
    };
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
    // reqwest is built without a default crypto provider (see Engine::new).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowrun"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                &dir.db(),
                "--dir",
            ])
            .arg(dir.workflows())
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
