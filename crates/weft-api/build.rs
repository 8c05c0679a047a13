//! Generates the wire protocol's Rust types and gRPC stubs from the .proto files
//! (needs `protoc`; Debian: protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/weft/discovery/v1/discovery.proto",
            "proto/weft/telemetry/v1/telemetry.proto",
            "proto/weft/tap/v1/tap.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
