//! The orchestrator binary with failpoints compiled in, for the crash tests: the
//! `FAILPOINTS` variable names the points to crash at, e.g.
//! `FAILPOINTS=runtime::after_intent_before_call=return`.

use clap::Parser;
use orchestrator::cli::{self, orchestrator::Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _failpoints = fail::FailScenario::setup();
    let args = Cli::parse();
    cli::orchestrator::main(args).await
}
