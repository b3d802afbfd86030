//! The orchestrator binary: parse the command line, run, exit.

use clap::Parser;
use orchestrator::cli::{self, orchestrator::Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    cli::init_logging("info,h2=warn,hyper=warn,tower=warn,sled=warn");
    match cli::orchestrator::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
