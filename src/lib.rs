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

pub mod cli;
pub mod schedule;
pub mod template;
pub mod workflow;
