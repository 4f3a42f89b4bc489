//! Writes the seed corpus of `update_decoder` to corpus/update_decoder/ (overwriting):
//! `AYA_BUILD_SKIP=1 cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`
//! Each seed first goes through the target's checks and must end at its expected version.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/update_decoder");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes, version) in wirefence_fuzz::seeds() {
        assert_eq!(wirefence_fuzz::check_updates(&bytes), version, "{name}: applied version");
        std::fs::write(dir.join(name), &bytes)?;
        println!("{}: {} bytes", dir.join(name).display(), bytes.len());
    }
    Ok(())
}
