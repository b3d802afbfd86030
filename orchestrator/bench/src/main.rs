//! The `bench` binary: `bench [FLAGS]` runs the benchmark (see `bench --help`); the hidden
//! `bench orchestrator ...` and `bench participant ...` are the orchestrator's and a
//! participant's own command lines, which the benchmark runs as its child processes.

use std::process::ExitCode;

use clap::Parser;

/// The allocator of the `orchestrator` and `participant` binaries, whose roles this binary
/// plays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The role's name stands in for the program name of its command line.
    let role_args = || args.iter().skip(1).cloned();
    match args.get(1).and_then(|role| role.to_str()) {
        Some("orchestrator") => {
            let cli = orchestrator::cli::orchestrator::Cli::parse_from(role_args());
            block_on(orchestrator::cli::orchestrator::main(cli))
        }
        Some("participant") => {
            let cli = participants::cli::Cli::parse_from(role_args());
            block_on(participants::cli::main(cli))
        }
        _ => bench::run(bench::cli::Args::parse()),
    }
}

/// What `#[tokio::main]` does for the real binaries: a multi-threaded runtime.
fn block_on(main: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
