//! Compiles `fedtune/v1/*.proto` with protox (pure Rust: no system protoc) and generates the
//! prost messages and tonic services, plus the encoded descriptor set for server reflection and the list of request types.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fedtune");
    let fds = protox::compile(["fedtune/v1/fedtune.proto"], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fedtune_v1_descriptor.bin"), fds.encode_to_vec())?;
    // The messages that arrive as requests: a server that cannot decode one answers
    // INVALID_ARGUMENT (the client's fault), see `src/codec.rs`.
    let mut requests: Vec<String> = fds
        .file
        .iter()
        .flat_map(|f| &f.service)
        .flat_map(|s| &s.method)
        .filter_map(|m| m.input_type.as_deref())
        .map(|t| t.trim_start_matches('.').to_string())
        .collect();
    requests.sort();
    requests.dedup();
    std::fs::write(out.join("request_types.rs"), format!("&{requests:?}"))?;
    // serde (proto3's JSON mapping) for every message: `--json` output.
    pbjson_build::Builder::new()
        .register_descriptors(&fds.encode_to_vec())?
        .out_dir(&out)
        .build(&[".fedtune.v1"])?;
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
