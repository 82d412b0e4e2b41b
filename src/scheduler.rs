//! Cron schedules: each enabled `schedule` workflow gets a run at every tick,
//! with payload `{"scheduled_at": "<RFC 3339>"}`.
//!
//! A tick is stored with its event (unique per workflow + tick), so it fires at
//! most once, also across restarts. Ticks missed while the process was down are
//! skipped and logged, never replayed in a burst: after a start, the first tick
//! considered is the first one after the start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::schedule;
use crate::store::{Millis, NewEvent, Store, now_millis, rfc3339};
use crate::workflow::Loaded;

/// Fires one tick of a schedule workflow; `Ok(false)` if that tick was already fired.
pub async fn fire<S: Store>(
    store: &S,
    loaded: &Loaded,
    tick: Millis,
) -> crate::store::Result<bool> {
    let at = rfc3339(tick);
    let run = crate::server::new_run(loaded, crate::store::from_millis(tick));
    let event = NewEvent {
        id: crate::engine::new_id(),
        name: format!("schedule:{}", loaded.workflow.name),
        payload: json!({ "scheduled_at": at }),
        received_at: now_millis(),
        runs: vec![run],
        tick: Some((loaded.workflow.name.clone(), tick)),
    };
    store.ingest(event).await
}

/// Logs, per schedule workflow, the ticks missed since its last fired tick.
pub async fn log_missed<S: Store>(store: &S, registry: &Registry, now: Millis) {
    let last = match store.last_ticks().await {
        Ok(l) => l.into_iter().collect::<HashMap<_, _>>(),
        Err(e) => return tracing::error!("cannot read the last schedule ticks: {e}"),
    };
    for loaded in &registry.schedules {
        let wf = &loaded.workflow;
        let (Some(expr), Some(last)) = (&wf.trigger.schedule, last.get(&wf.name)) else {
            continue;
        };
        if let Ok(cron) = schedule::parse(expr) {
            let missed = schedule::ticks_between(&cron, *last, now, 10_000);
            if missed > 0 {
                let more = if missed == 10_000 { "at least " } else { "" };
                tracing::warn!(
                    workflow = %wf.name,
                    "skipped {more}{missed} ticks of `{expr}` missed while flowrun was down (last fired {})",
                    rfc3339(*last)
                );
            }
        }
    }
}

/// Runs schedules until `shutdown`, following registry changes.
pub async fn run<S: Store>(
    store: Arc<S>,
    mut registry: watch::Receiver<Arc<Registry>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let started = now_millis();
    let initial = registry.borrow().clone();
    log_missed(&*store, &initial, started).await;
    // Per workflow name: ticks up to this time are done (fired or skipped).
    let mut cursor: HashMap<String, Millis> = HashMap::new();
    loop {
        let current = registry.borrow_and_update().clone();
        let now = now_millis();
        let mut due: Vec<(Arc<Loaded>, Millis)> = Vec::new();
        for loaded in &current.schedules {
            let wf = &loaded.workflow;
            let Some(Ok(cron)) = wf.trigger.schedule.as_deref().map(schedule::parse) else {
                continue;
            };
            let from = *cursor.entry(wf.name.clone()).or_insert(now);
            if let Some(next) = schedule::next_tick(&cron, from) {
                due.push((Arc::clone(loaded), next));
            }
        }
        let earliest = due.iter().map(|(_, t)| *t).min();
        let wait = earliest.map_or(Duration::from_secs(3600), |t| {
            Duration::from_millis(u64::try_from(t - now).unwrap_or(0))
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = registry.changed() => {
                if changed.is_err() { return; }
                continue;
            }
            () = tokio::time::sleep(wait) => {}
        }
        let now = now_millis();
        let mut retry_soon = false;
        for (loaded, tick) in due.into_iter().filter(|(_, t)| *t <= now) {
            let name = loaded.workflow.name.clone();
            match fire(&*store, &loaded, tick).await {
                Ok(true) => {
                    tracing::info!(workflow = %name, "schedule tick {}", rfc3339(tick));
                    metrics.accepted(1);
                    wake.notify_one();
                }
                Ok(false) => {
                    tracing::debug!(workflow = %name, "tick {} already fired", rfc3339(tick))
                }
                Err(e) => {
                    // Not lost: the cursor stays, so this tick is tried again (the unique key
                    // still keeps it at most once).
                    tracing::error!(workflow = %name, "cannot store schedule tick {}: {e}; retrying", rfc3339(tick));
                    retry_soon = true;
                    continue;
                }
            }
            // Any further ticks already past (a stalled process) are skipped, not burst.
            cursor.insert(name, tick.max(now));
        }
        if retry_soon {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
