//! The `flowrun` binary: parse arguments, run the command, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flowrun::cli::Cli::parse();
    flowrun::cli::init_logging(&cli);
    flowrun::cli::run(cli)
}
