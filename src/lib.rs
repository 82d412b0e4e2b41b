//! flowrun: a GitOps workflow runner.
//!
//! # Layout
//!
//! The modules follow the way a workflow travels, load → validate → render → execute:
//!
//! - [`cli`]: the command line (`validate`, `run`, `schema`), mapping results to exit codes.
//! - [`workflow`]: the file format: YAML with positions, the JSON Schema, semantic checks, diagnostics.
//! - [`schedule`]: cron expressions (five fields, UTC).
//! - [`template`]: one minijinja environment with strict undefined; renders URLs, headers and bodies.
//! - [`secrets`]: secret values from the environment or a file, and their redaction from output.
//! - [`engine`]: runs a workflow's actions in order: HTTP attempts, Flow's classification, retries.
//! - [`report`]: prints a run's result as text or JSON.
//! - [`registry`]: the loaded workflow set and how a reload replaces it (last good versions kept).
//! - [`watch`]: hot reload: file events → debounce → reload → atomic swap; SIGHUP.
//! - [`store`]: durable events, runs, attempts, due retries and schedule ticks (SQLite).
//! - [`scheduler`]: cron ticks → runs, each tick once across restarts.
//! - [`worker`]: claims due runs and takes them one step at a time with the engine.
//! - [`server`]: `serve`'s HTTP API (ingest, run history, health).
//! - [`metrics`]: Prometheus counters, gauges and the HTTP latency histogram.
//! - [`shutdown`]: SIGTERM/Ctrl-C → one cancellation token.

pub mod cli;
pub mod engine;
pub mod metrics;
pub mod registry;
pub mod report;
pub mod schedule;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod template;
pub mod watch;
pub mod worker;
pub mod workflow;
