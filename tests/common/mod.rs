//! Shared by the HTTP tests: a scripted axum server on 127.0.0.1:0 that records
//! every request it receives, and a YAML dedent helper.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
    echo: bool,
}

impl Reply {
    /// An answer with this status and an empty body.
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
            echo: false,
        }
    }

    /// A 200 with this JSON body.
    pub fn json(value: &serde_json::Value) -> Self {
        Reply::status(200)
            .header("content-type", "application/json")
            .body(&value.to_string())
    }

    /// A 200 whose JSON body repeats the request's headers and body back.
    pub fn echo() -> Self {
        Reply {
            echo: true,
            ..Reply::status(200)
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: &str) -> Self {
        body.clone_into(&mut self.body);
        self
    }

    /// Waits this long before sending the status line.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// With `echo`, the body becomes this reply's status with the request echoed.
    pub fn with_echo(mut self) -> Self {
        self.echo = true;
        self
    }
}

/// How a handler ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It returned its response.
    Completed,
    /// Its future was dropped before it returned (the client went away).
    Cancelled,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Upper-case method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Every header, names lower-case, in arrival order (repeats kept).
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: Vec<u8>,
    /// When the request reached the handler.
    pub at: Instant,
    end: Arc<Mutex<Option<End>>>,
}

impl Hit {
    /// The only value of header `name`; panics when it repeats.
    pub fn header(&self, name: &str) -> Option<String> {
        let values = self.all(name);
        assert!(values.len() <= 1, "header `{name}` repeats: {values:?}");
        values.into_iter().next()
    }

    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("the body is UTF-8")
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is JSON ({e}): {}", self.text()))
    }

    /// How the handler ended, waiting up to `within` for it to end.
    pub fn end(&self, within: Duration) -> Option<End> {
        let deadline = Instant::now() + within;
        loop {
            let end = *self.end.lock().expect("lock");
            if end.is_some() || Instant::now() >= deadline {
                return end;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[derive(Default)]
struct Shared {
    routes: Mutex<HashMap<String, Vec<Reply>>>,
    hits: Mutex<Vec<Hit>>,
}

/// Marks the handler cancelled if it is dropped before it completes.
struct DropGuard(Arc<Mutex<Option<End>>>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let mut end = self.0.lock().expect("lock");
        if end.is_none() {
            *end = Some(End::Cancelled);
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let end = Arc::new(Mutex::new(None));
    let guard = DropGuard(Arc::clone(&end));
    let hit = Hit {
        method: method.as_str().to_owned(),
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
        end,
    };
    let reply = {
        let mut hits = shared.hits.lock().expect("lock");
        let seen = hits.iter().filter(|h| h.path == path).count();
        hits.push(hit.clone());
        let routes = shared.routes.lock().expect("lock");
        // The nth request to a path gets the nth reply; the last one repeats.
        routes
            .get(&path)
            .and_then(|replies| replies.get(seen).or_else(|| replies.last()))
            .cloned()
            .unwrap_or_else(|| Reply::status(200))
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut builder = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        builder = builder.header(name, value);
    }
    let body = if reply.echo {
        serde_json::json!({
            "method": hit.method,
            "headers": hit.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&hit.body),
        })
        .to_string()
    } else {
        reply.body
    };
    let response = builder.body(Body::from(body)).expect("a valid response");
    *guard.0.lock().expect("lock") = Some(End::Completed);
    response
}

/// A recording HTTP server on 127.0.0.1, on its own thread and runtime, so
/// both async engine tests and blocking CLI tests can use it.
pub struct Server {
    base: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Starts a server; unscripted paths answer 200 with an empty body.
    pub fn start() -> Server {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0");
                addr_tx
                    .send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                // Stopping drops the runtime, and every connection with it.
                tokio::select! {
                    r = axum::serve(listener, app) => r.expect("serve"),
                    _ = stopped => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("the server starts");
        Server {
            base: format!("http://{addr}"),
            shared,
            stop: Some(stop),
        }
    }

    /// Scripts the replies to `path`: the nth request gets the nth reply, the last repeats.
    pub fn route(&self, path: &str, replies: Vec<Reply>) -> &Self {
        self.shared
            .routes
            .lock()
            .expect("lock")
            .insert(path.to_owned(), replies);
        self
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Every request to `path` so far, in arrival order.
    pub fn hits(&self, path: &str) -> Vec<Hit> {
        self.shared
            .hits
            .lock()
            .expect("lock")
            .iter()
            .filter(|h| h.path == path)
            .cloned()
            .collect()
    }

    /// Every request so far.
    pub fn all_hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().expect("lock").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Strips the indentation common to every non-blank line, so YAML can be
/// written indented inside Rust code, and puts the server's address in
/// place of `BASE`.
pub fn yaml(text: &str, base: &str) -> String {
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    out.trim_start_matches('\n').replace("BASE", base)
}

/// A port nothing listens on: bound, read, and released.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}
