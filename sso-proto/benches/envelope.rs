//! Envelope seal/open against raw ring AES-256-GCM on the same input, in the same run.
//!
//! The machines are noisy, so this does not print absolute numbers alone: each round
//! times a batch of the candidate and a batch of the baseline back to back, and the
//! reported ratio is the median of the per-round ratios. Run with
//! `cargo bench -p sso-proto`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sso_proto::envelope;
use sso_proto::{EnvelopeKey, KeyId, MasterSecret};

const ROUNDS: usize = 41;
const BATCH: u32 = 20_000;

fn main() {
    let rng = SystemRandom::new();
    let secret = MasterSecret::generate(&rng).expect("rng");
    let key = EnvelopeKey::new(KeyId::generate(&rng).expect("rng"), &secret);
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret.expose_secret()).expect("32-byte key"));
    let aad = b"tenant=42;table=users";

    println!("envelope vs raw ring AES-256-GCM; median of {ROUNDS} interleaved rounds of {BATCH} ops");
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "case", "ours ns/op", "base ns/op", "ratio"
    );
    for size in [64usize, 1024] {
        let plaintext = vec![0x5au8; size];
        let sealed = envelope::seal(&key, aad, &plaintext).expect("seal");

        // Raw ring seal: a buffer of the same shape, a fresh random nonce per message (as
        // any correct caller needs), in-place encryption and the tag appended.
        let ring_seal = || {
            let mut nonce = [0u8; 12];
            rng.fill(&mut nonce).expect("rng");
            let mut buf = Vec::with_capacity(size + 16);
            buf.extend_from_slice(&plaintext);
            let tag = ring_key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
                .expect("seal");
            buf.extend_from_slice(tag.as_ref());
            buf
        };
        let ours_seal = || envelope::seal(&key, aad, black_box(&plaintext)).expect("seal");
        report(&format!("seal {size} B"), ours_seal, ring_seal);

        // Raw ring seal with a fixed nonce: the bare AEAD cost, no randomness.
        let ring_seal_fixed = || {
            let mut buf = Vec::with_capacity(size + 16);
            buf.extend_from_slice(&plaintext);
            let tag = ring_key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut buf)
                .expect("seal");
            buf.extend_from_slice(tag.as_ref());
            buf
        };
        // A valid message under the zero nonce, which both raw openers below accept.
        let ring_sealed = ring_seal_fixed();
        report(&format!("seal {size} B (ring fixed nonce)"), ours_seal, ring_seal_fixed);

        let ours_open = || envelope::open(black_box(&sealed), aad, |_| Some(&key)).expect("open");
        let ring_open = || {
            let mut buf = black_box(&ring_sealed).clone();
            let nonce = Nonce::assume_unique_for_key([0; 12]);
            let len = ring_key
                .open_in_place(nonce, Aad::from(aad), &mut buf)
                .expect("valid")
                .len();
            buf.truncate(len);
            buf
        };
        report(&format!("open {size} B"), ours_open, ring_open);

        // The same AEAD crate the envelope uses (RustCrypto aes-gcm, whose key schedule is
        // zeroized on drop), raw: isolates the envelope's own overhead from the choice of
        // AES-GCM implementation.
        let raw_cipher = Aes256Gcm::new(secret.expose_secret().into());
        let raw_nonce = aes_gcm::Nonce::try_from(&[0u8; 12][..]).expect("12 bytes");
        let rc_open = || {
            let mut buf = black_box(&ring_sealed).clone();
            let (body, tag) = buf.split_at_mut(size);
            let tag = aes_gcm::Tag::try_from(&*tag).expect("16 bytes");
            raw_cipher
                .decrypt_inout_detached(&raw_nonce, aad, body.into(), &tag)
                .expect("valid");
            buf.truncate(size);
            buf
        };
        report(&format!("open {size} B vs raw aes-gcm"), ours_open, rc_open);
    }
}

fn report<A: FnMut() -> R, B: FnMut() -> S, R, S>(name: &str, mut ours: A, mut base: B) {
    let mut ratios = Vec::with_capacity(ROUNDS);
    let mut ours_ns = Vec::with_capacity(ROUNDS);
    let mut base_ns = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        // Alternate which side goes first so neither always gets the warm cache.
        let (a, b) = if round % 2 == 0 {
            let a = time(&mut ours);
            (a, time(&mut base))
        } else {
            let b = time(&mut base);
            (time(&mut ours), b)
        };
        ours_ns.push(a.as_nanos() as f64 / f64::from(BATCH));
        base_ns.push(b.as_nanos() as f64 / f64::from(BATCH));
        ratios.push(a.as_secs_f64() / b.as_secs_f64());
    }
    println!(
        "{:<32} {:>12.1} {:>12.1} {:>7.2}x",
        name,
        median(&mut ours_ns),
        median(&mut base_ns),
        median(&mut ratios)
    );
}

fn time<F: FnMut() -> R, R>(f: &mut F) -> Duration {
    let start = Instant::now();
    for _ in 0..BATCH {
        black_box(f());
    }
    start.elapsed()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
