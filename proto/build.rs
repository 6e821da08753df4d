//! Generates Rust code for the .proto contracts with tonic/prost.
//! Needs `protoc` on PATH (or PROTOC); the README's commands install it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "switchyard/v1/inference.proto",
        "switchyard/cluster/v1/cluster.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchyard_descriptor.bin"))
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
