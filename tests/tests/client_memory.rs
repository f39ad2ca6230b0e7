//! After the cache drops a key (retired on the server), the key's bytes are nowhere in
//! this process's readable memory. Runs alone in its own test binary, so no other test's
//! keys are around.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use sso_client::Client;
use tests::{Pki, ServerSetup, TestServer, bin};

const MASK: u8 = 0x5a;

/// Counts places in our own readable mappings where `masked ^ MASK` appears, without ever
/// holding the unmasked bytes in a buffer of our own.
fn occurrences(masked: &[u8]) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut found = 0;
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
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let first = masked[0] ^ MASK;
            let hay = &buf[..n];
            let mut i = 0;
            while let Some(off) = hay[i..].iter().position(|b| *b == first) {
                let at = i + off;
                if at + masked.len() <= n
                    && hay[at..at + masked.len()]
                        .iter()
                        .zip(masked)
                        .all(|(a, b)| a ^ MASK == *b)
                {
                    found += 1;
                }
                i = at + 1;
            }
            // Overlap by one needle so a match across chunk borders is seen.
            pos += (n.saturating_sub(masked.len() - 1)).max(1) as u64;
        }
    }
    buf.iter_mut().for_each(|b| *b = 0);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_key_is_not_left_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::new(&dir.path().join("a"), &pki, "node-a", "", "");
    let server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
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
    // Self-check: while cached, the scanner finds it.
    assert!(occurrences(&masked) > 0, "the scanner cannot see a key that is cached");

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
    let left = occurrences(&masked);
    assert_eq!(left, 0, "{left} copies of a dropped key remain in readable memory");
}
