//! `read_body` leaves no copy of a request body behind: every heap block freed while a
//! body is read and then dropped is scanned for the body's bytes.
//!
//! The allocator (`sso_os::wipe_probe`) wraps the system one; while armed, each block it
//! frees (and each block a reallocation leaves) is searched for `MARKER`. A body made of several frames
//! passes through the frames themselves, any joined copy, the growing output buffer; all
//! of them must be wiped before they go back to the allocator. Only blocks freed count:
//! memory still held is the caller's `Zeroizing` result, wiped when it drops (checked
//! too, by dropping it while armed).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, header};
use sso_daemon::json::{BodyLimits, read_body};
use sso_os::wipe_probe::WipeProbe;

/// 32 bytes no allocator, runtime or test harness writes by chance.
const MARKER: &[u8; 32] = b"\x9e\x13wipe-me-if-you-can!\x07\xf1\x00\xee\x5a\x33\xc4\x81\x02\x11\x22";

/// The scanning allocator lives in sso-os, the one crate with `unsafe` code.
#[global_allocator]
static PROBE: WipeProbe = WipeProbe::new(MARKER);

/// A body that arrives as the given frames, each a `Bytes` of its own (as hyper hands
/// them over), without a size hint (so nothing can size the buffer in advance).
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A frame of `n` markers, built in place so no other copy exists.
fn frame(n: usize) -> Bytes {
    let mut v = Vec::with_capacity(n * MARKER.len());
    for _ in 0..n {
        v.extend_from_slice(MARKER);
    }
    Bytes::from(v)
}

#[tokio::test(flavor = "current_thread")]
async fn no_copy_of_a_multi_frame_body_is_left_behind() {
    let limits = BodyLimits {
        max_bytes: 1 << 20,
        timeout: Duration::from_secs(5),
    };
    // With and without a Content-Length (which lets the reader size its buffer once),
    // frames of growing sizes (so a growing buffer must move).
    for declared in [true, false] {
        let sizes = [1usize, 3, 7, 20];
        let total: usize = sizes.iter().sum::<usize>() * MARKER.len();
        let mut builder = Request::builder().method("POST").uri("/v1/seal");
        if declared {
            builder = builder.header(header::CONTENT_LENGTH, total);
        }
        let req = builder.body(Frames(VecDeque::new())).unwrap();
        let (parts, _) = req.into_parts();
        PROBE.arm();
        let frames = Frames(sizes.iter().map(|&n| frame(n)).collect());
        let body = read_body(Request::from_parts(parts, frames), limits).await.unwrap();
        let whole = body.len() == total && body.chunks(MARKER.len()).all(|c| c == MARKER);
        drop(body);
        let left_behind = PROBE.disarm();
        assert!(whole, "the body read is not the body sent");
        assert_eq!(
            left_behind, 0,
            "blocks holding the body were freed unwiped (content-length given: {declared})"
        );
    }
}
