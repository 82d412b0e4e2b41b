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
//! - [`store`]: durable events, runs, attempts and due retries (SQLite).
//! - [`worker`]: claims due runs and takes them one step at a time with the engine.
//! - [`server`]: `serve`'s HTTP API (ingest, run history, health).
//! - [`shutdown`]: SIGTERM/Ctrl-C → one cancellation token.

pub mod cli;
pub mod engine;
pub mod report;
pub mod schedule;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod template;
pub mod worker;
pub mod workflow;
