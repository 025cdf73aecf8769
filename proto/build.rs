//! Compiles the `.proto` files with the vendored protoc (set `PROTOC` to use another), so
//! the build needs nothing but cargo.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/ouroboros/common/v1/common.proto",
    "proto/ouroboros/target/v1/target.proto",
    "proto/ouroboros/draft/v1/draft.proto",
    "proto/ouroboros/v1/generate.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ouroboros_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
