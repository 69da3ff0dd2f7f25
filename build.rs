//! Compiles `proto/marchproxy/*.proto` into Rust with no system `protoc`: protox parses the files,
//! tonic-prost-build generates messages, clients and servers, and the descriptor set is kept for
//! gRPC reflection and for printing messages as JSON.

use std::{env, path::PathBuf};

const PROTOS: [&str; 3] = [
    "proto/marchproxy/types.proto",
    "proto/marchproxy/module.proto",
    "proto/marchproxy/nlb.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("marchproxy_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
