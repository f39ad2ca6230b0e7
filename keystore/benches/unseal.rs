//! Unseal cost: opening a passphrase store with the default argon2id parameters (64 MiB,
//! 3 passes), beside a key-file store as the baseline, in the same run.
//! Run with `cargo bench -p keystore`.

use std::time::Instant;

use keystore::{CreateOptions, SealedStore, UnsealKey};
use secrecy::SecretString;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pass_path = dir.path().join("pass.db");
    let file_path = dir.path().join("file.db");
    let pass = UnsealKey::passphrase(SecretString::from("benchmark passphrase")).expect("passphrase");
    let file = UnsealKey::generate_key_file(&dir.path().join("unseal.key")).expect("key file");
    let options = CreateOptions::new("bench");
    for (path, key) in [(&pass_path, &pass), (&file_path, &file)] {
        let mut store = SealedStore::create(path, key, &options).expect("create");
        for _ in 0..10 {
            store.rotate().expect("rotate");
        }
    }

    let rounds = 11;
    let mut pass_ms = Vec::new();
    let mut file_ms = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let store = SealedStore::open(&pass_path, &pass).expect("open");
        store.keyring().expect("keyring");
        pass_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        let store = SealedStore::open(&file_path, &file).expect("open");
        store.keyring().expect("keyring");
        file_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    pass_ms.sort_by(f64::total_cmp);
    file_ms.sort_by(f64::total_cmp);
    let (p, f) = (pass_ms[rounds / 2], file_ms[rounds / 2]);
    println!("unseal + read 10-key keyring, median of {rounds}:");
    println!("  passphrase (argon2id 64 MiB, t=3, p=1): {p:8.1} ms");
    println!("  key file (no KDF):                      {f:8.1} ms");
    println!("  the KDF is {:.0}x the rest of opening a store", p / f);
}
