//! The `participant` binary: parse the command line, run, exit (see `participants::cli`).

use clap::Parser;

/// mimalloc, as in the orchestrator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    participants::cli::main(participants::cli::Cli::parse()).await
}
