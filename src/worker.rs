//! Workers: claim due runs from the store, take each one step at a time with
//! the engine, and record every step with the run's next state.
//!
//! Only one timer is kept: the dispatcher sleeps until the earliest due run
//! (or a wake-up from ingest, or the poll interval), never a task per retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use tracing::Instrument as _;

use crate::engine::{self, ActionAt, ActionReport, ActionStatus, Engine, RunInput, Step};
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::store::{Claimed, NextState, StepRecord, Store, from_millis, now_millis};
use crate::workflow::{self, Workflow};

/// How workers behave.
#[derive(Debug, Clone)]
pub struct Config {
    /// Runs worked on at once.
    pub concurrency: usize,
    /// How long a claim is held before another worker may take the run over.
    pub lease: Duration,
    /// Longest sleep between looks at the store (the fallback to wake-ups).
    pub poll: Duration,
    /// How long in-flight attempts may take to finish at shutdown.
    pub grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            concurrency: 256,
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            grace: Duration::from_secs(10),
        }
    }
}

/// A pinned workflow version, parsed once per process, with the secrets it reads.
#[derive(Clone)]
struct Pinned {
    workflow: Arc<Workflow>,
    secrets: Arc<std::collections::BTreeSet<String>>,
}

/// Why a run's pinned version is not at hand.
enum Pin {
    /// It is gone or no longer loads: the run cannot go on.
    Missing(String),
    /// The store could not be read: try again later.
    Unavailable(String),
}

/// What workers share.
pub struct Workers<S> {
    store: Arc<S>,
    engine: Engine,
    secrets: Secrets,
    /// Ingest and retries ring this so the dispatcher looks again at once.
    pub wake: Arc<Notify>,
    id: String,
    config: Config,
    cache: Mutex<HashMap<String, Pinned>>,
    metrics: Arc<Metrics>,
}

impl<S: Store> Workers<S> {
    /// Workers over `store`, identified by a fresh id.
    pub fn new(
        store: Arc<S>,
        engine: Engine,
        secrets: Secrets,
        metrics: Arc<Metrics>,
        config: Config,
    ) -> Arc<Self> {
        Arc::new(Workers {
            store,
            engine,
            secrets,
            wake: Arc::new(Notify::new()),
            id: format!("worker-{}", engine::new_id()),
            config,
            cache: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Claims and runs due work until `shutdown`, then lets in-flight steps finish within the grace period.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut inflight: JoinSet<()> = JoinSet::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            while inflight.try_join_next().is_some() {}
            // Claim in chunks (at least half the slots) rather than one run per finished task:
            // each claim is a write, and fewer larger claims keep the writer's batches full.
            let busy = inflight.len();
            let free = if busy > self.config.concurrency / 2 {
                0
            } else {
                self.config.concurrency - busy
            };
            let mut claimed = 0;
            if free > 0 {
                let now = now_millis();
                let lease_until = self.lease_until(now);
                match self.store.claim(&self.id, now, lease_until, free).await {
                    Ok(runs) => {
                        claimed = runs.len();
                        for run in runs {
                            let me = Arc::clone(&self);
                            // Every log line about a run carries its id (and, inside, its workflow).
                            let span = tracing::info_span!("run", run_id = %run.id, workflow = tracing::field::Empty);
                            let stop = shutdown.clone();
                            inflight
                                .spawn(async move { me.execute(run, stop).await }.instrument(span));
                        }
                    }
                    Err(e) => tracing::error!("cannot claim work: {e}"),
                }
            }
            if claimed > 0 && claimed < free {
                continue;
            }
            if free == 0 {
                // Saturated: wait for a slot.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = inflight.join_next() => {}
                }
                continue;
            }
            let sleep = self.until_next_due().await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            }
        }
        // Graceful: in-flight attempts finish within the grace period; the rest stays in the store.
        let drained = tokio::time::timeout(self.config.grace, async {
            while inflight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "{} steps still in flight after the grace period; they will be re-sent on restart",
                inflight.len()
            );
            inflight.abort_all();
        }
        if let Err(e) = self.store.release(&self.id).await {
            tracing::error!("cannot release claims: {e}");
        }
    }

    fn lease_until(&self, now: crate::store::Millis) -> crate::store::Millis {
        now.saturating_add(crate::store::millis(self.config.lease))
    }

    /// Drives `step` while renewing the run's claim every third of the lease, so a long
    /// attempt is never taken over (and sent twice) while it is still in flight.
    ///
    /// `None` when the claim was lost: the step is dropped (its attempt cancelled), since
    /// the worker that took the run over sends it again with the same delivery id.
    async fn renewing<T>(
        &self,
        run_id: &str,
        step: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let period = (self.config.lease / 3).max(Duration::from_millis(10));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(step);
        loop {
            tokio::select! {
                out = &mut step => return Some(out),
                _ = renew.tick() => {
                    match self.store.renew(run_id, &self.id, self.lease_until(now_millis())).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("lost the claim on this run to another worker; stopping here");
                            return None;
                        }
                        Err(e) => tracing::error!("cannot renew the claim: {e}"),
                    }
                }
            }
        }
    }

    async fn until_next_due(&self) -> Duration {
        match self.store.next_due().await {
            Ok(Some(due)) => {
                let wait = u64::try_from(due.saturating_sub(now_millis())).unwrap_or(0);
                Duration::from_millis(wait).min(self.config.poll)
            }
            Ok(None) => self.config.poll,
            Err(e) => {
                tracing::error!("cannot read the next due time: {e}");
                self.config.poll
            }
        }
    }

    /// The run's pinned workflow version, parsed once per process.
    async fn workflow(&self, run: &Claimed) -> Result<Pinned, Pin> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&run.version_hash)
            .cloned();
        if let Some(wf) = cached {
            return Ok(wf);
        }
        let (file, source) = match self.store.version(&run.version_hash).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Err(Pin::Missing(format!(
                    "the pinned workflow version {} is missing",
                    run.version_hash
                )));
            }
            Err(e) => {
                return Err(Pin::Unavailable(format!(
                    "cannot read the pinned workflow version: {e}"
                )));
            }
        };
        let loaded = workflow::load_str(&file, &source).map_err(|errors| {
            let first = errors
                .first()
                .map(|d| d.message.clone())
                .unwrap_or_default();
            Pin::Missing(format!(
                "the pinned workflow version no longer loads: {first}"
            ))
        })?;
        let pinned = Pinned {
            secrets: Arc::new(crate::secrets::referenced(&loaded.workflow)),
            workflow: Arc::new(loaded.workflow),
        };
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(run.version_hash.clone(), pinned.clone());
        Ok(pinned)
    }

    /// Takes one claimed run forward until it waits for a retry or finishes.
    async fn execute(&self, mut run: Claimed, shutdown: CancellationToken) {
        let (wf, names) = match self.workflow(&run).await {
            Ok(p) => (p.workflow, p.secrets),
            Err(Pin::Missing(e)) => return self.abandon(&run, None, e).await,
            Err(Pin::Unavailable(e)) => {
                // A store blip is not the run's fault: leave it claimed; the lease ends and it is taken again.
                return tracing::error!("{e}; the run will be taken again when its lease ends");
            }
        };
        tracing::Span::current().record("workflow", wf.name.as_str());
        let secrets = match self.secrets.select(&names) {
            Ok(s) => s,
            Err(e) => return self.abandon(&run, Some(&wf), e.to_string()).await,
        };
        let redactor = secrets.redactor();
        let input = RunInput {
            run_id: run.id.clone(),
            payload: std::mem::take(&mut run.payload),
            trigger: std::mem::take(&mut run.trigger),
            secrets,
        };
        loop {
            let index = run.next_action;
            let Some(action) = wf.actions.get(index) else {
                return self
                    .abandon(
                        &run,
                        Some(&wf),
                        format!("the run points at action {index}, which does not exist"),
                    )
                    .await;
            };
            let now = now_millis();
            let first_attempt_at = run.first_attempt_at.unwrap_or(now);
            let at = ActionAt {
                index,
                attempt: run.attempt,
                delivery_id: &run.delivery_id,
                first_started: from_millis(first_attempt_at),
            };
            let step = self
                .engine
                .step(&wf, &input, &run.steps, &at, false, &redactor)
                .instrument(tracing::info_span!("action", action = index));
            let Some(out) = self.renewing(&run.id, step).await else {
                return;
            };
            if let Some(r) = &out.record {
                self.metrics
                    .attempt(&r.class, r.duration_ms as f64 / 1000.0);
            }
            let done_at = now_millis();
            let (report, next) = match out.step {
                Step::Retry(delay) => (
                    None,
                    NextState::Retry {
                        attempt: run.attempt + 1,
                        due_at: done_at.saturating_add(crate::store::millis(delay)),
                        first_attempt_at,
                    },
                ),
                Step::Done {
                    status,
                    error,
                    result,
                } => {
                    let report = ActionReport {
                        id: action.id.clone(),
                        status,
                        attempts: if out.record.is_some() { run.attempt } else { 0 },
                        http_status: out.record.as_ref().and_then(|r| r.http_status),
                        error,
                        message: out.message,
                        request: None,
                        attempt_log: Vec::new(),
                    };
                    if let (Some(id), Some(result)) = (&action.id, result) {
                        run.steps.insert(id.clone(), result);
                    }
                    let next = if status == ActionStatus::Failed {
                        NextState::Finished {
                            status: "failed",
                            not_run: rest(&wf, index),
                        }
                    } else if index + 1 >= wf.actions.len() {
                        NextState::Finished {
                            status: "succeeded",
                            not_run: Vec::new(),
                        }
                    } else {
                        NextState::Advance {
                            next_action: index + 1,
                            delivery_id: engine::new_id(),
                            steps: run.steps.clone(),
                        }
                    };
                    (Some(report), next)
                }
            };
            let step = StepRecord {
                run_id: run.id.clone(),
                action: index,
                attempt: out.record,
                report,
                next: next.clone(),
                at: done_at,
                lease_until: self.lease_until(done_at),
                worker: self.id.clone(),
            };
            match self.store.record(step).await {
                Ok(()) => {}
                Err(crate::store::Error::LostClaim) => {
                    // Fenced: another worker took the run over and carries it on.
                    return tracing::warn!(
                        "lost the claim on this run to another worker; its step was not recorded here"
                    );
                }
                Err(e) => {
                    // The claim stays; the lease ends and the step is taken again (same delivery id).
                    return tracing::error!(run = %run.id, "cannot record a step: {e}");
                }
            }
            match next {
                NextState::Advance {
                    next_action,
                    delivery_id,
                    ..
                } => {
                    run.next_action = next_action;
                    run.delivery_id = delivery_id;
                    run.attempt = 1;
                    run.first_attempt_at = None;
                    if shutdown.is_cancelled() {
                        // Shutting down: the next action stays pending (released at the end of the drain).
                        return;
                    }
                }
                NextState::Retry { .. } => {
                    // The dispatcher's timer must consider this new due time.
                    self.wake.notify_one();
                    return;
                }
                NextState::Finished { status, .. } => {
                    self.metrics.finished(status);
                    return;
                }
            }
        }
    }

    /// Fails a run that cannot go on (its pinned version does not load, a secret is missing).
    async fn abandon(&self, run: &Claimed, wf: Option<&Workflow>, error: String) {
        tracing::error!(run = %run.id, "{error}");
        let index = run.next_action;
        let report = ActionReport {
            id: wf
                .and_then(|w| w.actions.get(index))
                .and_then(|a| a.id.clone()),
            status: ActionStatus::Failed,
            attempts: 0,
            http_status: None,
            error: Some(error),
            message: None,
            request: None,
            attempt_log: Vec::new(),
        };
        let step = StepRecord {
            run_id: run.id.clone(),
            action: index,
            attempt: None,
            report: Some(report),
            next: NextState::Finished {
                status: "failed",
                not_run: wf.map(|w| rest(w, index)).unwrap_or_default(),
            },
            at: now_millis(),
            lease_until: 0,
            worker: self.id.clone(),
        };
        match self.store.record(step).await {
            Ok(()) => self.metrics.finished("failed"),
            Err(e) => tracing::error!(run = %run.id, "cannot record a failed run: {e}"),
        }
    }
}

/// The actions after `index`, which will not run.
fn rest(wf: &Workflow, index: usize) -> Vec<(usize, Option<String>)> {
    wf.actions
        .iter()
        .enumerate()
        .skip(index + 1)
        .map(|(i, a)| (i, a.id.clone()))
        .collect()
}
