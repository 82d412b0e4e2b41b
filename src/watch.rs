//! Hot reload: notify → channel → debounce → reload → swap.
//!
//! The notify callback is synchronous: it only `try_send`s into a tokio channel;
//! bursts (an editor's atomic save, a `git pull` of 50 files) are debounced on
//! the async side into one reload, and the new set is swapped in whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::{Change, Registry};
use crate::secrets::Secrets;

/// Quiet time that ends a burst of file events.
pub const QUIET: Duration = Duration::from_millis(40);
/// A burst never delays a reload longer than this.
pub const MAX_DELAY: Duration = Duration::from_millis(150);

/// Whether a file event can change the workflow set.
fn relevant(event: &notify::Event) -> bool {
    if event.kind.is_access() {
        return false;
    }
    event.paths.iter().any(|p| {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        // Any visible path may matter: a workflow file, or a directory (`team.billing/`)
        // moved in or out with workflows inside. Reloads are debounced, so extra ones are cheap.
        !hidden
    })
}

/// Reloads `dir` into `registry`, logging what changed (and, for new versions, any
/// secret they read that is not set); returns whether it loaded.
pub fn reload(
    dir: &Path,
    registry: &watch::Sender<Arc<Registry>>,
    metrics: &Metrics,
    secrets: &Secrets,
) -> bool {
    let prev = registry.borrow().clone();
    let started = Instant::now();
    match Registry::reload(&prev, dir) {
        Ok((next, changes)) => {
            for d in &next.errors {
                tracing::warn!("{}", d.render_text().trim_end());
            }
            for c in &changes {
                tracing::info!("{c}");
                let name = match c {
                    Change::Added { name, .. } | Change::Changed { name, .. } => name,
                    Change::Removed { .. } | Change::KeptLastGood { .. } => continue,
                };
                if let Some(e) = next
                    .entries
                    .iter()
                    .find(|e| &e.loaded.workflow.name == name)
                    && let Err(err) =
                        secrets.select(&crate::secrets::referenced(&e.loaded.workflow))
                {
                    tracing::warn!(workflow = %name, "{err}; its runs (or, for `verify`, its events) will fail");
                }
            }
            metrics.reloaded(next.errors.len(), next.entries.len());
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reloaded `{}`",
                dir.display()
            );
            registry.send_replace(Arc::new(next));
            true
        }
        Err(e) => {
            // The directory itself is unreadable: keep everything as it is.
            tracing::error!("cannot reload: {e}");
            metrics.reload_failed();
            false
        }
    }
}

/// A file watcher on the workflow directory, started before the first reload so
/// that no change between loading and watching is missed.
pub struct Watch {
    dir: PathBuf,
    rx: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Watch {
    /// Starts watching `dir` recursively (a failure is logged; SIGHUP still reloads).
    pub fn start(dir: &Path) -> Watch {
        let (tx, rx) = mpsc::channel::<()>(1);
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                // A full channel already means "reload pending": dropping the extra signal is right.
                Ok(event) if relevant(&event) => drop(tx.try_send(())),
                Ok(_) => {}
                Err(e) => tracing::warn!("file watcher: {e}"),
            });
        let watcher =
            match watcher.and_then(|mut w| w.watch(dir, RecursiveMode::Recursive).map(|()| w)) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!("cannot watch `{}`: {e}; changes need SIGHUP", dir.display());
                    None
                }
            };
        Watch {
            dir: dir.to_path_buf(),
            rx,
            _watcher: watcher,
        }
    }

    /// Reloads on changes (debounced) and on SIGHUP until `shutdown`.
    pub async fn run(
        mut self,
        registry: watch::Sender<Arc<Registry>>,
        metrics: Arc<Metrics>,
        secrets: Secrets,
        shutdown: CancellationToken,
    ) {
        let mut hup = hangup();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = hup.recv() => {
                    tracing::info!("SIGHUP: full reload");
                    reload(&self.dir, &registry, &metrics, &secrets);
                    continue;
                }
                got = self.rx.recv() => if got.is_none() { return },
            }
            // Debounce: wait for QUIET without events, at most MAX_DELAY in all.
            let deadline = tokio::time::Instant::now() + MAX_DELAY;
            loop {
                let quiet = tokio::time::Instant::now() + QUIET;
                tokio::select! {
                    () = tokio::time::sleep_until(quiet.min(deadline)) => break,
                    got = self.rx.recv() => if got.is_none() { break },
                }
            }
            reload(&self.dir, &registry, &metrics, &secrets);
        }
    }
}

/// SIGHUP as a stream (never fires where unsupported).
struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                if s.recv().await.is_none() {
                    self.0 = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

fn hangup() -> Hangup {
    Hangup(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok())
}
