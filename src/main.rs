//! The `flowrun` binary: parse arguments, run the command, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    flowrun::cli::run(flowrun::cli::Cli::parse())
}
