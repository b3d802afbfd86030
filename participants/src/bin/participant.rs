//! The `participant` binary: parse the command line, run, exit (see `participants::cli`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    participants::cli::main(participants::cli::Cli::parse()).await
}
