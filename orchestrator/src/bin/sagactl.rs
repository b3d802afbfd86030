//! The sagactl binary: parse the command line, run, print, exit.

use clap::Parser;
use orchestrator::cli::{self, sagactl::Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    cli::init_logging("warn");
    match cli::sagactl::run(args).await {
        Ok(outcome) => {
            if !outcome.text.is_empty() {
                println!("{}", outcome.text.trim_end());
            }
            std::process::ExitCode::from(outcome.exit_code)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
