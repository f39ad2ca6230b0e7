//! After a client drops a key (retired on the server), no spelling of the key's bytes is
//! left anywhere in the client's process memory: not raw, not hex (lower or upper case),
//! not base64 (standard or URL-safe, padded or unpadded), and not the AES-256 key
//! schedule the envelope cipher expanded from it (an AES-256 schedule begins with the raw
//! key; the needle "round keys 2-3" is the 32 bytes that follow, which only an expanded
//! schedule contains). The key arrives as JSON over
//! TLS, so its base64 text passes through hyper's and rustls' buffers unless it arrives
//! sealed (docs/key-delivery.md).
//!
//! Two clients: this test process's own `sso_client::Client`, and a real `sso-agent`
//! process whose memory is read through `/proc/PID/mem`. The scanner checks itself: a
//! key planted in every spelling must be found, and the agent's current key must be
//! found raw in the agent (so the scan really reads its memory).
//!
//! Runs in its own test binary, so no other test's keys are around.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use sso_client::Client;
use tests::TestAgent;
use zeroize::Zeroizing;

/// Needles are kept XOR-masked, so the scanning process never holds them in the clear
/// (it would find its own copies).
const MASK: u8 = 0x5a;

/// One spelling of a key, masked.
struct Needle {
    name: &'static str,
    masked: Vec<u8>,
}

/// Every spelling of the key whose bytes XOR MASK are `masked_raw`. The clear bytes exist
/// only in wiped temporaries while this runs.
fn spellings(masked_raw: &[u8]) -> Vec<Needle> {
    let raw = Zeroizing::new(masked_raw.iter().map(|b| b ^ MASK).collect::<Vec<u8>>());
    let mut forms: Vec<(&'static str, Zeroizing<Vec<u8>>)> = Vec::new();
    forms.push(("raw", Zeroizing::new(raw.to_vec())));
    let mut hex_lower = Zeroizing::new(vec![0u8; raw.len() * 2]);
    hex::encode_to_slice(&*raw, &mut hex_lower).unwrap();
    let hex_upper = Zeroizing::new(hex_lower.to_ascii_uppercase());
    forms.push(("hex", hex_lower));
    forms.push(("HEX", hex_upper));
    let engines: [(&'static str, &base64::engine::GeneralPurpose); 4] = [
        ("base64", &STANDARD),
        ("base64 unpadded", &STANDARD_NO_PAD),
        ("base64url", &URL_SAFE),
        ("base64url unpadded", &URL_SAFE_NO_PAD),
    ];
    for (name, engine) in engines {
        let mut out = Zeroizing::new(vec![0u8; 64]);
        let n = engine.encode_slice(&*raw, &mut out).unwrap();
        out.truncate(n);
        forms.push((name, out));
    }
    forms.push(("round keys 2-3", Zeroizing::new(round_keys_2_and_3(&raw).to_vec())));
    forms
        .into_iter()
        .map(|(name, clear)| Needle {
            name,
            masked: clear.iter().map(|b| b ^ MASK).collect(),
        })
        .collect()
}

/// Bytes 32..64 of the AES-256 key schedule of `key` (FIPS-197 §5.2, words 8..16), in the
/// byte order AES-NI implementations store round keys in. Computed here from the
/// definition, so the test does not depend on any of the implementations it checks; the
/// self-check in each test finds it in memory while the key is cached, which also checks
/// this function.
fn round_keys_2_and_3(key: &[u8]) -> Zeroizing<[u8; 32]> {
    fn mul(mut a: u8, mut b: u8) -> u8 {
        let mut p = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                p ^= a;
            }
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= 0x1b;
            }
            b >>= 1;
        }
        p
    }
    fn sbox(x: u8) -> u8 {
        let inv = if x == 0 {
            0
        } else {
            (1..=255u8).find(|&y| mul(x, y) == 1).unwrap()
        };
        inv ^ inv.rotate_left(1) ^ inv.rotate_left(2) ^ inv.rotate_left(3) ^ inv.rotate_left(4) ^ 0x63
    }
    let mut w = Zeroizing::new([[0u8; 4]; 16]);
    for (i, word) in key.chunks_exact(4).enumerate() {
        w[i].copy_from_slice(word);
    }
    for i in 8..16 {
        let mut t = Zeroizing::new(w[i - 1]);
        if i % 8 == 0 {
            *t = [sbox(t[1]) ^ 0x01, sbox(t[2]), sbox(t[3]), sbox(t[0])];
        } else if i % 8 == 4 {
            *t = [sbox(t[0]), sbox(t[1]), sbox(t[2]), sbox(t[3])];
        }
        for j in 0..4 {
            w[i][j] = w[i - 8][j] ^ t[j];
        }
    }
    let mut out = Zeroizing::new([0u8; 32]);
    for (i, word) in w[8..16].iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(word);
    }
    out
}

#[test]
fn round_keys_match_fips_197() {
    // FIPS-197 Appendix A.3: the AES-256 key expansion example, words w8..w15.
    let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4").unwrap();
    assert_eq!(
        hex::encode(*round_keys_2_and_3(&key)),
        "9ba354118e6925afa51a8b5f2067fcdea8b09c1a93d194cdbe49846eb75d5b9a"
    );
}

/// Counts, per needle, the places in process `pid`'s readable mappings where the needle's
/// clear bytes appear. Reads `/proc/PID/mem` over `/proc/PID/maps`, every readable
/// mapping but the kernel's vsyscall/vvar pages.
fn occurrences(pid: u32, needles: &[Needle]) -> Vec<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("cannot open /proc/{pid}/mem (the scan needs CAP_SYS_PTRACE): {e}"));
    let longest = needles.iter().map(|n| n.masked.len()).max().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut found = vec![0usize; needles.len()];
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let path = parts.nth(3).unwrap_or("");
        if !perms.starts_with('r') || path.starts_with("[v") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut pos = start;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            if mem.seek(SeekFrom::Start(pos)).is_err() {
                break;
            }
            let n = match mem.read(&mut buf[..want]) {
                Ok(n) if n >= longest => n,
                _ => break,
            };
            scanned += n as u64;
            let hay = &buf[..n];
            let last = pos + (n as u64) >= end;
            // Chunks overlap by `longest - 1` bytes: a match that starts in the overlap is
            // counted with the next chunk, so a match across a border is seen exactly once.
            let counted_below = if last { n } else { n - (longest - 1) };
            for (needle, count) in needles.iter().zip(found.iter_mut()) {
                let masked = &needle.masked;
                let first = masked[0] ^ MASK;
                let mut i = 0;
                while let Some(off) = hay[i..counted_below].iter().position(|b| *b == first) {
                    let at = i + off;
                    if at + masked.len() <= n
                        && hay[at..at + masked.len()]
                            .iter()
                            .zip(masked)
                            .all(|(a, b)| a ^ MASK == *b)
                    {
                        *count += 1;
                    }
                    i = at + 1;
                }
            }
            if last {
                break;
            }
            pos += (n - (longest - 1)) as u64;
        }
    }
    buf.iter_mut().for_each(|b| *b = 0);
    assert!(scanned > 1 << 20, "scanned only {scanned} bytes of process {pid}");
    found
}

fn report(needles: &[Needle], counts: &[usize]) -> String {
    needles
        .iter()
        .zip(counts)
        .map(|(n, c)| format!("{}: {c}", n.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Self-check of the scanner on process `pid`... through this process: a random key
/// planted in every spelling (in the clear, in live buffers) must be found in each.
fn scanner_finds_a_planted_key() {
    let rng = ring::rand::SystemRandom::new();
    let mut planted = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&rng, planted.as_mut_slice()).unwrap();
    let masked: Vec<u8> = planted.iter().map(|b| b ^ MASK).collect();
    let needles = spellings(&masked);
    let live: Vec<Zeroizing<Vec<u8>>> = needles
        .iter()
        .map(|n| Zeroizing::new(n.masked.iter().map(|b| b ^ MASK).collect()))
        .collect();
    let counts = occurrences(std::process::id(), &needles);
    assert!(
        counts.iter().all(|&c| c > 0),
        "the scanner missed a planted key: {}",
        report(&needles, &counts)
    );
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_key_is_not_left_in_this_process_in_any_spelling() {
    scanner_finds_a_planted_key();
    let tests::OneServer {
        dir: _dir, pki, server, ..
    } = tests::one_server();
    let cert = pki.client("client");
    let client = Client::builder()
        .endpoint(format!("https://localhost:{}", server.https.port()))
        .ca(&pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    client.refresh().await.unwrap();
    let sealed = client.seal(b"", b"data under the old key").await.unwrap();

    // Remember the old key only masked.
    let (old_id, masked): (sso_client::KeyId, Vec<u8>) = {
        let handle = client.primary_key().await.unwrap();
        (
            handle.key_id(),
            handle.expose_secret().iter().map(|b| b ^ MASK).collect(),
        )
    };
    let needles = spellings(&masked);
    // Self-check: while cached, the scanner finds it raw and its expanded schedule.
    let schedule = needles.iter().position(|n| n.name == "round keys 2-3").unwrap();
    let cached = occurrences(std::process::id(), &needles);
    assert!(cached[0] > 0, "the scanner cannot see a key that is cached");
    assert!(
        cached[schedule] > 0,
        "the scanner cannot see the cached key's round keys: {}",
        report(&needles, &cached)
    );

    // Rotate, then retire the old key; the watching client drops it.
    let admin = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    let r = admin
        .post(&format!("/v1/admin/keys/{old_id}/retire"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let started = Instant::now();
    while client.is_cached(&old_id) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the client did not drop the retired key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        client.open(b"", &sealed).await,
        Err(sso_client::Error::KeyRetired(_))
    ));
    // Let arc-swap release any snapshot still referenced by a reader.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = occurrences(std::process::id(), &needles);
    assert!(
        left.iter().all(|&c| c == 0),
        "copies of a dropped key remain in this process: {}",
        report(&needles, &left)
    );
}

/// The status code and the body's text (read it with `tests::wire`).
fn curl(socket: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_agent_dropped_is_not_left_in_its_memory_in_any_spelling() {
    scanner_finds_a_planted_key();
    let tests::OneServer { dir, pki, server, .. } = tests::one_server();
    let cert = pki.client("client");
    let config = dir.path().join("agent.toml");
    let agent_config = pki.agent_config(
        "client",
        format!("https://localhost:{}", server.https.port()),
        dir.path().join("agent.sock"),
    );
    std::fs::write(&config, agent_config.to_toml()).unwrap();
    let agent = TestAgent::start(&config, &dir.path().join("agent.log"));
    let seal = [
        "-X",
        "POST",
        "http://agent/v1/seal",
        "-d",
        r#"{"plaintext":"aGVsbG8gd29ybGQ="}"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    let (envelope, old_id) = loop {
        let (code, body) = curl(&agent.socket, &seal);
        if code == 200 {
            let sealed = tests::wire::<sso_proto::wire::agent::SealAnswer>(&body);
            break (sealed.envelope, sealed.key_id);
        }
        assert!(Instant::now() < deadline, "the agent never sealed: {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Learn the old key (masked) from the server, the way curl would fetch it.
    let masked: Vec<u8> = {
        let reader = tests::Client::new(server.https, &pki.ca_file, Some(&cert));
        let reply = reader.get("/v1/keyring").await.unwrap();
        assert_eq!(reply.status, 200);
        let v = reply.json();
        let b64 = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == old_id.as_str())
            .and_then(|k| k["key"].as_str())
            .expect("the keyring holds the agent's key");
        let raw = Zeroizing::new(STANDARD.decode(b64).unwrap());
        raw.iter().map(|b| b ^ MASK).collect()
    };
    let needles = spellings(&masked);
    let pid = agent.child.id();
    // Self-check: the scan reads the agent's memory, where the cached key is found raw
    // and expanded.
    let schedule = needles.iter().position(|n| n.name == "round keys 2-3").unwrap();
    let cached = occurrences(pid, &needles);
    assert!(cached[0] > 0, "the scanner cannot see the key the agent holds");
    assert!(
        cached[schedule] > 0,
        "the scanner cannot see the round keys of the key the agent holds: {}",
        report(&needles, &cached)
    );

    // Rotate, retire the old key; wait until the agent refuses to open under it.
    let admin = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    let r = admin
        .post(&format!("/v1/admin/keys/{old_id}/retire"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let open_body = serde_json::json!({ "envelope": envelope }).to_string();
    let open = ["-X", "POST", "http://agent/v1/open", "-d", open_body.as_str()];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = curl(&agent.socket, &open);
        if code == 410 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still opens under the retired key: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Traffic after the drop, as in the field: a few seals under the new key.
    for _ in 0..5 {
        assert_eq!(curl(&agent.socket, &seal).0, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = occurrences(pid, &needles);
    assert!(
        left.iter().all(|&c| c == 0),
        "copies of a dropped key remain in the agent (pid {pid}): {}",
        report(&needles, &left)
    );
}
