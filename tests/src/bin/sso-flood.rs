//! `sso-flood`: opens many connections to a Unix socket and holds them, as a hostile
//! local user would. Tests run it under another uid (`Command::uid`) against `sso-agent`.
//!
//! `sso-flood SOCKET COUNT HOLD_SECS`: connects up to COUNT times as fast as it can (a
//! full listen queue is retried; it gives up after 5 s without a single success), prints
//! `opened N failed M`, then keeps every connection open for HOLD_SECS and exits.
#![forbid(unsafe_code)]

use std::io::Write;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, count, hold] = args.as_slice() else {
        eprintln!("usage: sso-flood SOCKET COUNT HOLD_SECS");
        std::process::exit(64);
    };
    let count: usize = count.parse().expect("COUNT");
    let hold: u64 = hold.parse().expect("HOLD_SECS");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut held = Vec::with_capacity(count);
        let mut failed = 0usize;
        let mut last_success = std::time::Instant::now();
        while held.len() < count && last_success.elapsed() < Duration::from_secs(5) {
            match tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(socket)).await {
                Ok(Ok(s)) => {
                    held.push(s);
                    last_success = std::time::Instant::now();
                }
                _ => {
                    // Full listen queue (EAGAIN): the agent is behind; try again shortly.
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "opened {} failed {failed}", held.len());
        let _ = out.flush();
        drop(out);
        tokio::time::sleep(Duration::from_secs(hold)).await;
        drop(held);
    });
}
