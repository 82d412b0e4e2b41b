//! `flowrun serve`: the HTTP ingest API and run history, the workers, retention,
//! all under one shutdown token.

pub mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::secrets::Secrets;
use crate::store::Store;
use crate::worker::{self, Workers};
use crate::workflow::{self, Diagnostic, Loaded};

/// The workflows currently loaded, indexed by event name.
#[derive(Debug, Default)]
pub struct Registry {
    /// Every valid workflow.
    pub all: Vec<Arc<Loaded>>,
    /// Event name → enabled workflows triggered by it.
    pub by_event: HashMap<String, Vec<Arc<Loaded>>>,
    /// Errors from the last load.
    pub errors: Vec<Diagnostic>,
}

impl Registry {
    /// Builds the registry from a loaded set.
    pub fn new(set: workflow::Set) -> Self {
        let all: Vec<Arc<Loaded>> = set.loaded.into_iter().map(Arc::new).collect();
        let mut by_event: HashMap<String, Vec<Arc<Loaded>>> = HashMap::new();
        for l in &all {
            if let (true, Some(event)) = (l.workflow.enabled, &l.workflow.trigger.event) {
                by_event
                    .entry(event.clone())
                    .or_default()
                    .push(Arc::clone(l));
            }
        }
        Registry {
            all,
            by_event,
            errors: set.diagnostics,
        }
    }

    /// Loads every workflow under `dir`.
    pub fn load(dir: &std::path::Path) -> workflow::Result<Self> {
        let files = workflow::discover(&[dir.to_path_buf()])?;
        Ok(Self::new(workflow::load_set(&files)?))
    }
}

/// How `serve` is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The workflow directory.
    pub dir: PathBuf,
    /// Largest accepted event body, in bytes.
    pub max_body: usize,
    /// Finished runs older than this are pruned.
    pub retain: Duration,
    /// Worker settings (concurrency, lease, poll, grace).
    pub workers: worker::Config,
}

/// What the HTTP handlers share.
pub struct AppState<S> {
    /// The store.
    pub store: Arc<S>,
    /// The loaded workflows.
    pub registry: RwLock<Arc<Registry>>,
    /// Set at shutdown: ingest answers 503.
    pub draining: AtomicBool,
    /// Largest accepted event body.
    pub max_body: usize,
    /// Rings the workers when an event is stored.
    pub wake: Arc<tokio::sync::Notify>,
}

impl<S> AppState<S> {
    /// The current registry.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(
            &self
                .registry
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
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
    match store.release(None).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            "{n} runs were in flight when the last process stopped; they will be re-sent"
        ),
        Err(e) => tracing::error!("cannot release old claims: {e}"),
    }
    for d in &registry.errors {
        tracing::warn!("{}", d.render_text().trim_end());
    }
    let workers = Workers::new(Arc::clone(&store), engine, secrets, config.workers.clone());
    let state = Arc::new(AppState {
        store: Arc::clone(&store),
        registry: RwLock::new(Arc::new(registry)),
        draining: AtomicBool::new(false),
        max_body: config.max_body,
        wake: Arc::clone(&workers.wake),
    });

    let worker_stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&workers).run(worker_stop.clone()));
    tasks.spawn(retention(
        Arc::clone(&store),
        config.retain,
        worker_stop.clone(),
    ));

    let app = routes::router(Arc::clone(&state));
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(
        "listening on {}",
        addr.map_or_else(|| "?".to_owned(), |a| a.to_string())
    );
    let http_state = Arc::clone(&state);
    let http_shutdown = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        http_shutdown.cancelled().await;
        // Stop taking events first: requests still arriving get 503.
        http_state.draining.store(true, Ordering::SeqCst);
    });
    let result = server.await;
    worker_stop.cancel();
    while tasks.join_next().await.is_some() {}
    result
}

async fn retention<S: Store>(store: Arc<S>, retain: Duration, stop: CancellationToken) {
    loop {
        let before =
            crate::store::now_millis() - i64::try_from(retain.as_millis()).unwrap_or(i64::MAX / 2);
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
