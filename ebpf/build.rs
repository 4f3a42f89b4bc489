//! Codegen setting of the eBPF object, passed to bpf-linker (which runs LLVM's BPF backend;
//! aya-build owns RUSTFLAGS, so this goes as a link argument).
//!
//! `allows-misaligned-mem-access` (LLVM 22, the bpf-linker `scripts/install.sh` installs):
//! without it LLVM splits every load it cannot prove aligned into byte loads, and packet
//! headers are at any alignment (the IP header is at offset 14 on Ethernet). The kernel
//! allows unaligned packet access on the JITs that handle it (x86-64, arm64), and the
//! verifier rejects the object at load time elsewhere: loudly, never silently wrong. Stack
//! accesses must stay aligned for the verifier; the programs keep their stack data in
//! aligned words (see `load` in `src/parse.rs` and the class keys in `src/classes.rs`).

fn main() {
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    // A global function (verified once, see src/classes.rs): kept exported.
    println!("cargo:rustc-link-arg=--export=wf_class_of");
    println!("cargo:rerun-if-changed=build.rs");
}
