//! Writes the seed corpora into `fuzz/seeds/<target>/`: run from `fuzz/` with
//! `cargo run --example make_seeds`.

fn main() -> std::io::Result<()> {
    let seeds = keystore::fuzzing::seeds().into_iter().chain(sso_proto::fuzzing::seeds());
    for (i, (target, bytes)) in seeds.enumerate() {
        let dir = std::path::Path::new("seeds").join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{i}")), bytes)?;
    }
    Ok(())
}
