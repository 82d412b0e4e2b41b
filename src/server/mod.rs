//! `flowrun serve`: the HTTP API, the workers, schedules, hot reload and
//! retention, all under one shutdown token.

pub mod auth;
pub mod routes;

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{self, Engine, RunInput};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::secrets::Secrets;
use crate::store::{NewRun, Store, Version};
use crate::worker::{self, Workers};
use crate::workflow::Loaded;

/// How `serve` is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The workflow directory (watched for changes).
    pub dir: PathBuf,
    /// Largest accepted event body, in bytes.
    pub max_body: usize,
    /// Finished runs older than this are pruned.
    pub retain: Duration,
    /// When set, `POST /events/*` needs `Authorization: Bearer <token>`.
    pub ingest_token: Option<String>,
    /// Worker settings (concurrency, lease, poll, grace).
    pub workers: worker::Config,
}

/// What the HTTP handlers share.
pub struct AppState<S> {
    /// The store.
    pub store: Arc<S>,
    /// The loaded workflows; a reload swaps in a whole new set.
    pub registry: watch::Sender<Arc<Registry>>,
    /// Set at shutdown: ingest answers 503.
    pub draining: AtomicBool,
    /// Largest accepted event body.
    pub max_body: usize,
    /// Required bearer token for ingest.
    pub ingest_token: Option<String>,
    /// Secrets (for `trigger.verify`).
    pub secrets: Secrets,
    /// Rings the workers when an event is stored.
    pub wake: Arc<tokio::sync::Notify>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Compiled `payload_schema`s, by workflow version hash.
    pub validators: std::sync::Mutex<std::collections::HashMap<String, Arc<jsonschema::Validator>>>,
}

impl<S> AppState<S> {
    /// The current registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.borrow().clone()
    }
}

/// A new run of `loaded`, pinned to its version, fired at `fired_at`.
pub fn new_run(loaded: &Loaded, fired_at: SystemTime) -> NewRun {
    NewRun {
        id: engine::new_id(),
        version: Version {
            hash: loaded.hash.clone(),
            name: loaded.workflow.name.clone(),
            file: loaded.file.clone(),
            source: loaded.source.clone(),
        },
        trigger: RunInput::trigger_for(&loaded.workflow, fired_at),
        delivery_id: engine::new_id(),
    }
}

/// Runs the server on `listener` until `shutdown` is cancelled; returns after draining.
pub async fn serve<S: Store>(
    listener: TcpListener,
    store: Arc<S>,
    engine: Engine,
    secrets: Secrets,
    registry: Registry,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Claims held when the last process died are given back: their steps are sent again.
    match store.recover(crate::store::now_millis()).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            "{n} runs were in flight when the last process stopped; they will be re-sent"
        ),
        Err(e) => tracing::error!("cannot release old claims: {e}"),
    }
    // The catch-up reload below logs the load errors and sets the workflow metrics.
    let metrics = Arc::new(Metrics::new());
    let workers = Workers::new(
        Arc::clone(&store),
        engine,
        secrets.clone(),
        Arc::clone(&metrics),
        config.workers.clone(),
    );
    // Watch first, then catch up: a change made between the first load and now is not missed.
    let watcher = crate::watch::Watch::start(&config.dir);
    if let Err(e) = store.listen(Arc::clone(&workers.wake)).await {
        tracing::warn!("cannot LISTEN for new work ({e}); polling instead");
    }
    let (registry_tx, _) = watch::channel(Arc::new(registry));
    crate::watch::reload(&config.dir, &registry_tx, &metrics, &secrets);
    let state = Arc::new(AppState {
        store: Arc::clone(&store),
        registry: registry_tx,
        draining: AtomicBool::new(false),
        max_body: config.max_body,
        ingest_token: config.ingest_token.clone(),
        secrets,
        wake: Arc::clone(&workers.wake),
        metrics: Arc::clone(&metrics),
        validators: std::sync::Mutex::default(),
    });

    let background = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&workers).run(background.clone()));
    tasks.spawn(retention(
        Arc::clone(&store),
        config.retain,
        background.clone(),
    ));
    tasks.spawn(crate::scheduler::run(
        Arc::clone(&store),
        state.registry.subscribe(),
        Arc::clone(&workers.wake),
        Arc::clone(&metrics),
        background.clone(),
    ));
    tasks.spawn(watcher.run(
        state.registry.clone(),
        Arc::clone(&metrics),
        state.secrets.clone(),
        background.clone(),
    ));

    let app = routes::router(Arc::clone(&state));
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(
        "listening on {}",
        addr.map_or_else(|| "?".to_owned(), |a| a.to_string())
    );
    let http_stop = CancellationToken::new();
    let mut http = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(http_stop.clone().cancelled_owned())
            .into_future(),
    );
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        // The server only stops by itself on an I/O error.
        r = &mut http => r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        // Workers, schedules, reload and retention run until shutdown: one that stops
        // (a panic) is critical, since events would be accepted and never run.
        Some(r) = tasks.join_next() => {
            let why = r.err().map_or_else(|| "stopped".to_owned(), |e| e.to_string());
            tracing::error!("a background task ended before shutdown ({why}); stopping");
            Err(std::io::Error::other(format!("a background task ended: {why}")))
        }
    };
    // Stop taking events (ingest and /readyz answer 503 while we drain), let in-flight
    // attempts finish within the grace period, then close the listener.
    state.draining.store(true, Ordering::SeqCst);
    background.cancel();
    while tasks.join_next().await.is_some() {}
    http_stop.cancel();
    if !http.is_finished()
        && tokio::time::timeout(Duration::from_secs(1), &mut http)
            .await
            .is_err()
    {
        http.abort();
    }
    tracing::info!("stopped");
    result
}

async fn retention<S: Store>(store: Arc<S>, retain: Duration, stop: CancellationToken) {
    loop {
        let before = crate::store::now_millis().saturating_sub(crate::store::millis(retain));
        match store.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("pruned {n} finished runs"),
            Err(e) => tracing::error!("cannot prune old runs: {e}"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
