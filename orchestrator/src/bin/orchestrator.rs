//! The orchestrator binary: parse the command line, run, exit.

use clap::Parser;
use orchestrator::cli::{self, orchestrator::Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    cli::orchestrator::main(args).await
}
