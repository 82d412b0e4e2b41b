//! Prometheus metrics for `serve` (`GET /metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: String,
}

/// A `status` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    /// Final status.
    pub status: String,
}

/// A `class` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Class {
    /// Outcome class: 2xx, 3xx, 4xx, 429, 5xx, timeout, connect_error, render_error.
    pub class: String,
}

/// Every metric `serve` exports.
pub struct Metrics {
    registry: Registry,
    events_accepted: Counter,
    events_rejected: Family<Reason, Counter>,
    runs_started: Counter,
    runs_finished: Family<Status, Counter>,
    attempts: Family<Class, Counter>,
    http_latency: Histogram,
    retry_queue: Gauge,
    pending_runs: Gauge,
    reloads: Counter,
    reload_failures: Counter,
    load_errors: Gauge,
    workflows: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowrun");
        let m = Metrics {
            events_accepted: Counter::default(),
            events_rejected: Family::default(),
            runs_started: Counter::default(),
            runs_finished: Family::default(),
            attempts: Family::default(),
            http_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            retry_queue: Gauge::default(),
            pending_runs: Gauge::default(),
            reloads: Counter::default(),
            reload_failures: Counter::default(),
            load_errors: Gauge::default(),
            workflows: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_accepted",
            "Events stored (202)",
            m.events_accepted.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused, by reason",
            m.events_rejected.clone(),
        );
        registry.register(
            "runs_started",
            "Runs created by events and schedules",
            m.runs_started.clone(),
        );
        registry.register(
            "runs_finished",
            "Runs finished, by status",
            m.runs_finished.clone(),
        );
        registry.register(
            "attempts",
            "HTTP attempts, by outcome class",
            m.attempts.clone(),
        );
        registry.register(
            "http_action_duration_seconds",
            "Duration of HTTP attempts",
            m.http_latency.clone(),
        );
        registry.register(
            "retry_queue_depth",
            "Runs waiting for a retry",
            m.retry_queue.clone(),
        );
        registry.register("runs_pending", "Runs not finished", m.pending_runs.clone());
        registry.register("reloads", "Workflow directory reloads", m.reloads.clone());
        registry.register(
            "reload_failures",
            "Reloads that could not read the directory",
            m.reload_failures.clone(),
        );
        registry.register(
            "workflow_load_errors",
            "Errors in the workflow files at the last load",
            m.load_errors.clone(),
        );
        registry.register(
            "workflows_loaded",
            "Workflows loaded (current or last good)",
            m.workflows.clone(),
        );
        Metrics { registry, ..m }
    }

    /// An event was stored with `runs` runs.
    pub fn accepted(&self, runs: usize) {
        self.events_accepted.inc();
        self.runs_started.inc_by(runs as u64);
    }

    /// An event was refused.
    pub fn rejected(&self, reason: &str) {
        self.events_rejected
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A run finished.
    pub fn finished(&self, status: &str) {
        self.runs_finished
            .get_or_create(&Status {
                status: status.to_owned(),
            })
            .inc();
    }

    /// An HTTP attempt ended in `class` after `seconds`.
    pub fn attempt(&self, class: &str, seconds: f64) {
        self.attempts
            .get_or_create(&Class {
                class: class.to_owned(),
            })
            .inc();
        self.http_latency.observe(seconds);
    }

    /// A reload finished with `errors` errors and `workflows` workflows.
    pub fn reloaded(&self, errors: usize, workflows: usize) {
        self.reloads.inc();
        self.load_errors
            .set(i64::try_from(errors).unwrap_or(i64::MAX));
        self.workflows
            .set(i64::try_from(workflows).unwrap_or(i64::MAX));
    }

    /// A reload could not read the directory.
    pub fn reload_failed(&self) {
        self.reload_failures.inc();
    }

    /// Sets the queue gauges (read from the store at scrape time).
    pub fn queue(&self, pending: u64, retrying: u64) {
        self.pending_runs
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.retry_queue
            .set(i64::try_from(retrying).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .unwrap_or_else(|e| panic!("BUG: writing to a String cannot fail: {e}"));
        out
    }
}
