//! `serve` benchmarks with SQLite (fsync on), printing what they measured.
//!
//! - P2: events/s accepted and fully delivered end to end: one-action workflows
//!   posting to a loopback sink, events sent by 64 concurrent HTTP clients.
//! - P6: p50/p99 latency of `POST /events` at a fixed 1,000 events/s.
//! - P5: RSS of a real `flowrun serve` process with 100,000 pending retries in the store.
//! - P4: time from saving a workflow file to its new version being live (`GET /workflows`).
//!
//! Run: `cargo bench --bench serve` (P5 needs `cargo build --release` first for the binary).
//! The load generator is this binary (tokio + reqwest), on the same 2 cores as the server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use flowrun::engine::{Engine, SystemClock};
use flowrun::registry::Registry;
use flowrun::secrets::Secrets;
use flowrun::server;
use flowrun::store::Store as _;
use flowrun::store::sqlite::SqliteStore;
use tokio_util::sync::CancellationToken;

const WORKFLOW: &str = "name: bench\ntrigger:\n  event: bench.event\nactions:\n  - http:\n      method: POST\n      url: \"http://SINK/hook\"\n      json:\n        n: \"{{ payload.n }}\"\n";

async fn sink() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    let app = Router::new().route(
        "/hook",
        post(move || {
            let h = Arc::clone(&h);
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, hits)
}

async fn start(
    dir: &Path,
    sink: SocketAddr,
) -> (
    SocketAddr,
    Arc<SqliteStore>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let store = Arc::new(SqliteStore::open(&dir.join("bench.db")).expect("store"));
    let (addr, stop, handle) = start_on(dir, sink, Arc::clone(&store)).await;
    (addr, store, stop, handle)
}

/// Writes the one-action bench workflow under `dir/workflows` and loads it.
fn workflows(dir: &Path, sink: SocketAddr) -> (std::path::PathBuf, Registry) {
    let wf_dir = dir.join("workflows");
    std::fs::create_dir_all(&wf_dir).expect("mkdir");
    std::fs::write(
        wf_dir.join("bench.yaml"),
        WORKFLOW.replace("SINK", &sink.to_string()),
    )
    .expect("write");
    let registry = Registry::load(&wf_dir).expect("load");
    (wf_dir, registry)
}

async fn start_on<S: flowrun::store::Store>(
    dir: &Path,
    sink: SocketAddr,
    store: Arc<S>,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let (wf_dir, registry) = workflows(dir, sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let engine = Engine::new(Arc::new(SystemClock)).expect("engine");
    let config = server::Config {
        dir: wf_dir,
        max_body: 1 << 20,
        retain: Duration::from_secs(86_400),
        ingest_token: None,
        workers: flowrun::worker::Config::default(),
    };
    let token = CancellationToken::new();
    let t = token.clone();
    let handle = tokio::spawn(async move {
        server::serve(
            listener,
            store,
            engine,
            Secrets::default(),
            registry,
            config,
            t,
        )
        .await
        .expect("serve");
    });
    (addr, token, handle)
}

/// Waits until the sink has `total` requests and the store no unfinished run.
async fn delivered<S: flowrun::store::Store>(hits: &AtomicUsize, total: usize, store: &S) {
    while hits.load(Ordering::Relaxed) < total || store.queue_depth().await.expect("depth").0 > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `total` events from `concurrency` clients, round-robin over `targets`.
async fn load(targets: &[SocketAddr], total: usize, concurrency: usize) -> Duration {
    let client = client();
    let next = Arc::new(AtomicUsize::new(0));
    let targets: Arc<Vec<SocketAddr>> = Arc::new(targets.to_vec());
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, targets) = (client.clone(), Arc::clone(&next), Arc::clone(&targets));
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                let addr = targets[n % targets.len()];
                let r = client
                    .post(format!("http://{addr}/events/bench.event"))
                    .body(format!("{{\"n\": {n}}}"))
                    .send()
                    .await
                    .expect("post");
                assert_eq!(r.status().as_u16(), 202);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    start.elapsed()
}

/// P3: end to end on PostgreSQL with `instances` in-process instances sharing one database.
async fn p3(url: &str, instances: usize, total: usize, concurrency: usize) {
    let (sink_addr, hits) = sink().await;
    let schema = format!("bench_{}", flowrun::engine::new_id().replace('-', ""));
    let url = format!(
        "{url}{}schema={schema}",
        if url.contains('?') { '&' } else { '?' }
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = Vec::new();
    let mut stores = Vec::new();
    for i in 0..instances {
        let store = Arc::new(
            flowrun::store::postgres::PgStore::connect(&url, 32)
                .await
                .expect("PostgreSQL"),
        );
        let sub = dir.path().join(format!("i{i}"));
        let (addr, stop, handle) = start_on(&sub, sink_addr, Arc::clone(&store)).await;
        servers.push((addr, stop, handle));
        stores.push(store);
    }
    let targets: Vec<SocketAddr> = servers.iter().map(|s| s.0).collect();
    let start = Instant::now();
    let accepted = load(&targets, total, concurrency).await;
    delivered(&hits, total, &*stores[0]).await;
    let delivered = start.elapsed();
    println!(
        "P3 postgres, {instances} instance(s): {total} events, {concurrency} concurrent clients: accepted {:.0} events/s; delivered end to end {:.0} events/s",
        total as f64 / accepted.as_secs_f64(),
        total as f64 / delivered.as_secs_f64()
    );
    for (_, stop, handle) in servers {
        stop.cancel();
        handle.await.expect("stop");
    }
    drop(stores);
    // Leave nothing behind in the database.
    let base = url.split('?').next().unwrap_or(&url).to_owned();
    if let Ok((client, conn)) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await;
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

async fn p2(total: usize, concurrency: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink_addr, hits) = sink().await;
    let (addr, store, stop, handle) = start(dir.path(), sink_addr).await;
    let start = Instant::now();
    let accepted = load(&[addr], total, concurrency).await;
    // Delivered: the sink has every request and the store no pending run.
    delivered(&hits, total, &*store).await;
    let delivered = start.elapsed();
    println!(
        "P2 sqlite: {total} events, {concurrency} concurrent clients: accepted in {:.2}s = {:.0} events/s; all delivered in {:.2}s = {:.0} events/s end to end",
        accepted.as_secs_f64(),
        total as f64 / accepted.as_secs_f64(),
        delivered.as_secs_f64(),
        total as f64 / delivered.as_secs_f64()
    );
    stop.cancel();
    handle.await.expect("stop");
}

async fn p6(rate: u64, seconds: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink_addr, _hits) = sink().await;
    let (addr, _store, stop, handle) = start(dir.path(), sink_addr).await;
    let client = client();
    let total = rate * seconds;
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        ticker.tick().await;
        let client = client.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = client
                .post(format!("http://{addr}/events/bench.event"))
                .body(format!("{{\"n\": {n}}}"))
                .send()
                .await
                .expect("post");
            assert_eq!(r.status().as_u16(), 202);
            t.elapsed()
        });
    }
    let mut lat = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while let Some(r) = tasks.join_next().await {
        lat.push(r.expect("task"));
    }
    let elapsed = start.elapsed();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "P6 sqlite: {total} events at {rate}/s (achieved {:.0}/s): POST /events latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        total as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        lat.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    stop.cancel();
    handle.await.expect("stop");
}

async fn p5(pending: usize) {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/flowrun");
    if !bin.exists() {
        println!("P5 skipped: build the binary first with `cargo build --release`");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink_addr, _hits) = sink().await;
    // Fill the store with runs whose retry is due tomorrow, through the real ingest path.
    {
        let (_, registry) = workflows(dir.path(), sink_addr);
        let loaded = Arc::clone(&registry.entries[0].loaded);
        let store = SqliteStore::open(&dir.path().join("bench.db")).expect("store");
        let tomorrow = flowrun::store::now_millis() + 86_400_000;
        let mut batch = tokio::task::JoinSet::new();
        let store = Arc::new(store);
        for n in 0..pending {
            let (store, loaded) = (Arc::clone(&store), Arc::clone(&loaded));
            batch.spawn(async move {
                let run = server::new_run(&loaded, flowrun::store::from_millis(tomorrow));
                store
                    .ingest(flowrun::store::NewEvent {
                        id: flowrun::engine::new_id(),
                        name: "bench.event".into(),
                        payload: serde_json::json!({"n": n}),
                        // Accepted "tomorrow": due then, like a pending retry.
                        received_at: tomorrow,
                        runs: vec![run],
                        tick: None,
                    })
                    .await
                    .expect("ingest");
            });
            if batch.len() >= 1024 {
                while batch.join_next().await.is_some() {}
            }
        }
        while batch.join_next().await.is_some() {}
    }
    let db = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut child = std::process::Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--db", &db, "--dir"])
        .arg(dir.path().join("workflows"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?")
        .to_owned();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_owned();
    println!("P5 sqlite: {pending} pending retries in the store: flowrun serve {rss} (peak {hwm})");
    let _ = child.kill();
    let _ = child.wait();
}

async fn p4(saves: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink_addr, _hits) = sink().await;
    let (addr, _store, stop, handle) = start(dir.path(), sink_addr).await;
    let client = client();
    let file = dir.path().join("workflows/bench.yaml");
    let mut times = Vec::with_capacity(saves);
    for i in 0..saves {
        let text = WORKFLOW.replace("SINK", &sink_addr.to_string()) + &format!("# save {i}\n");
        let hash = flowrun::workflow::version_hash(&text);
        let start = Instant::now();
        std::fs::write(&file, &text).expect("save");
        loop {
            let body = client
                .get(format!("http://{addr}/workflows"))
                .send()
                .await
                .expect("get")
                .text()
                .await
                .expect("text");
            if body.contains(&hash) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "reload never happened"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "P4 reload: {saves} saves: saved file live after median {:.1} ms, p95 {:.1} ms, max {:.1} ms (debounce 40 ms quiet / 150 ms max)",
        ms(times[saves / 2]),
        ms(times[(saves * 95 / 100).min(saves - 1)]),
        ms(times[saves - 1])
    );
    stop.cancel();
    handle.await.expect("stop");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let args: Vec<String> = std::env::args().collect();
    let only =
        |name: &str| !args.iter().any(|a| a.starts_with('P')) || args.iter().any(|a| a == name);
    rt.block_on(async {
        if only("P2") {
            p2(20_000, 64).await;
        }
        if only("P6") {
            p6(1000, 10).await;
        }
        if only("P4") {
            p4(20).await;
        }
        if only("P3") {
            match std::env::var("FLOWRUN_TEST_POSTGRES_URL") {
                Ok(url) => {
                    p3(&url, 1, 10_000, 64).await;
                    p3(&url, 2, 10_000, 64).await;
                }
                Err(_) => println!("P3 skipped: set FLOWRUN_TEST_POSTGRES_URL"),
            }
        }
        if only("P5") {
            p5(100_000).await;
        }
    });
}
