//! The orchestrator binary: parse the command line, run, exit.

use clap::Parser;
use orchestrator::cli::{self, orchestrator::Cli};

/// mimalloc: less CPU per saga than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    cli::orchestrator::main(args).await
}
