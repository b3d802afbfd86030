//! Compiles the .proto files with protox (pure Rust, no `protoc` needed), generates the
//! tonic/prost code from the resulting descriptor set, and writes the same set to
//! `OUT_DIR/descriptor.bin` for server reflection and dynamic calls.

use prost::Message;

const PROTOS: &[&str] = &[
    "saga/v1/saga.proto",
    "participant/v1/ledger.proto",
    "payment/v1/payment.proto",
    "store/v1/store.proto",
    "rider/v1/rider.proto",
    "notifier/v1/notifier.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
