//! Compiles `wirefence/v1/wirefence.proto` with protox (pure Rust, so no `protoc` on the
//! machine) and writes the descriptor set next to the generated code for gRPC reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "wirefence/v1/wirefence.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("wirefence_descriptor.bin"), fds.encode_to_vec())?;
    // Messages carrying secrets get hand-written, redacting Debug impls (src/redact.rs).
    tonic_prost_build::configure()
        .skip_debug([
            ".wirefence.v1.RegisterRequest",
            ".wirefence.v1.RegisterResponse",
            ".wirefence.v1.CreateEnrollmentKeyReply",
            ".wirefence.v1.RotateCredentialReply",
        ])
        .compile_fds(fds)?;
    Ok(())
}
