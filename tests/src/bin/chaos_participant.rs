//! The `participant` binary, built in this crate so the chaos harness and its tests can
//! name it (`CARGO_BIN_EXE_chaos-participant`) and find it next to the `chaos` binary; use
//! it with `--allow-fault-injection` to accept faults on its admin endpoint.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    participants::cli::main(participants::cli::Cli::parse()).await
}
