//! `read_body` leaves no copy of a request body behind: every heap block freed while a
//! body is read and then dropped is scanned for the body's bytes.
//!
//! The allocator below wraps the system one; while armed, each block it frees (and each
//! block a reallocation leaves) is searched for `MARKER`. A body made of several frames
//! passes through the frames themselves, any joined copy, the growing output buffer; all
//! of them must be wiped before they go back to the allocator. Only blocks freed count:
//! memory still held is the caller's `Zeroizing` result, wiped when it drops (checked
//! too, by dropping it while armed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, header};
use sso_daemon::json::{BodyLimits, read_body};

/// 32 bytes no allocator, runtime or test harness writes by chance.
const MARKER: &[u8; 32] = b"\x9e\x13wipe-me-if-you-can!\x07\xf1\x00\xee\x5a\x33\xc4\x81\x02\x11\x22";

static ARMED: AtomicBool = AtomicBool::new(false);
static LEFT_BEHIND: AtomicUsize = AtomicUsize::new(0);

struct Scanning;

fn scan(ptr: *mut u8, len: usize) {
    if !ARMED.load(SeqCst) || len < MARKER.len() {
        return;
    }
    // SAFETY: the block is still allocated (we are about to free it) and `len` bytes long.
    #[allow(unsafe_code)]
    let block = unsafe { std::slice::from_raw_parts(ptr, len) };
    if block.windows(MARKER.len()).any(|w| w == MARKER) {
        LEFT_BEHIND.fetch_add(1, SeqCst);
    }
}

// SAFETY: every call is forwarded to `System`; `scan` only reads a block before it is freed.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Scanning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        scan(ptr, layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Always move, so the old block is scanned as it is left behind.
        // SAFETY: the new layout is valid (GlobalAlloc::realloc's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            scan(ptr, layout.size());
            // SAFETY: `ptr` was allocated with `layout`.
            unsafe { System.dealloc(ptr, layout) };
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Scanning = Scanning;

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
        LEFT_BEHIND.store(0, SeqCst);
        ARMED.store(true, SeqCst);
        let frames = Frames(sizes.iter().map(|&n| frame(n)).collect());
        let body = read_body(Request::from_parts(parts, frames), limits).await.unwrap();
        let whole = body.len() == total && body.chunks(MARKER.len()).all(|c| c == MARKER);
        drop(body);
        ARMED.store(false, SeqCst);
        assert!(whole, "the body read is not the body sent");
        assert_eq!(
            LEFT_BEHIND.load(SeqCst),
            0,
            "blocks holding the body were freed unwiped (content-length given: {declared})"
        );
    }
}
