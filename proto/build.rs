//! Compiles `fedtune/v1/*.proto` with protox (pure Rust: no system protoc) and generates the
//! prost messages and tonic services, plus the encoded descriptor set for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fedtune");
    let fds = protox::compile(["fedtune/v1/fedtune.proto"], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fedtune_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
