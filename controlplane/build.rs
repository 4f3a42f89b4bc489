//! The gRPC server code of wirefence.proto for the control plane. Messages are the
//! contract's types from wirefence-proto, but for `Update`: the Watch stream sends
//! `crate::wire::Update`, which writes shared peer encodings by reference.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "wirefence/v1/wirefence.proto";
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", root.join(proto).display());
    let fds = protox::compile([proto], [&root])?;
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".wirefence.v1", "::wirefence_proto::v1")
        .extern_path(".wirefence.v1.Update", "crate::wire::Update")
        .compile_fds(fds)?;
    Ok(())
}
