//! The command line: `validate`, `run`, `schema`. Each command returns its exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::workflow::{self, Format};

/// Exit code: every file valid / the run succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: errors were found / the run failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the command itself could not run (bad path, unusable input).
pub const EXIT_USAGE: u8 = 2;

/// flowrun: a GitOps workflow runner.
#[derive(Debug, Parser)]
#[command(name = "flowrun", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check workflow files and report every error as file:line:col.
    Validate {
        /// Files or directories (searched recursively for .yaml/.yml).
        #[arg(default_value = "workflows")]
        paths: Vec<PathBuf>,
        /// How to print errors.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print the workflow JSON Schema that the binary embeds.
    Schema,
}

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let code = match cli.command {
        Command::Validate { paths, format } => validate(&paths, format),
        Command::Schema => {
            print!("{}", workflow::schema::SCHEMA_JSON);
            EXIT_OK
        }
    };
    ExitCode::from(code)
}

fn validate(paths: &[PathBuf], format: Format) -> u8 {
    let set = match workflow::discover(paths).and_then(|files| workflow::load_set(&files)) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    print!(
        "{}",
        workflow::diagnostic::render_all(&set.diagnostics, format)
    );
    let files = plural(set.files, "file");
    let errors = plural(set.diagnostics.len(), "error");
    eprintln!("checked {files}: {errors}");
    if set.diagnostics.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// `1 file`, `2 files`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
