//! A global allocator for tests that prove a secret was wiped before its memory went back to
//! the allocator (feature `wipe-probe`, for dev-dependencies: no binary links it).
//!
//! It wraps the system allocator; while armed, each block it frees, and each block a
//! reallocation leaves behind (it always moves), is searched for a marker the test put in
//! its secret. A block that still holds the marker when freed is a copy nobody wiped. Here
//! and not in the test that uses it because this crate holds the workspace's only `unsafe`
//! code (`sso-daemon/tests/body_wipe.rs`).
//!
//! ```ignore
//! #[global_allocator]
//! static PROBE: sso_os::wipe_probe::WipeProbe = sso_os::wipe_probe::WipeProbe::new(MARKER);
//! PROBE.arm();
//! // ... make and drop the secret ...
//! assert_eq!(PROBE.disarm(), 0, "blocks holding the secret were freed unwiped");
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

/// The scanning allocator; see the module documentation.
#[derive(Debug)]
pub struct WipeProbe {
    marker: &'static [u8],
    armed: AtomicBool,
    left_behind: AtomicUsize,
}

impl WipeProbe {
    /// A probe looking for `marker`: pick bytes no allocator, runtime or test harness
    /// writes by chance (32 random-looking bytes). An empty marker finds nothing.
    pub const fn new(marker: &'static [u8]) -> Self {
        Self {
            marker,
            armed: AtomicBool::new(false),
            left_behind: AtomicUsize::new(0),
        }
    }

    /// Starts counting freed blocks that hold the marker, from zero.
    pub fn arm(&self) {
        self.left_behind.store(0, SeqCst);
        self.armed.store(true, SeqCst);
    }

    /// Stops counting; returns how many freed blocks held the marker since [`Self::arm`].
    pub fn disarm(&self) -> usize {
        self.armed.store(false, SeqCst);
        self.left_behind.load(SeqCst)
    }

    /// Counts the block at `ptr` if it holds the marker. Allocates nothing.
    fn scan(&self, ptr: *const u8, len: usize) {
        if !self.armed.load(SeqCst) || self.marker.is_empty() || len < self.marker.len() {
            return;
        }
        // SAFETY: the caller passes a block that is still allocated (about to be freed) and
        // `len` bytes long, so it is valid for reads of `len` bytes.
        #[allow(unsafe_code)]
        let block = unsafe { std::slice::from_raw_parts(ptr, len) };
        if block.windows(self.marker.len()).any(|w| w == self.marker) {
            self.left_behind.fetch_add(1, SeqCst);
        }
    }
}

// SAFETY: every allocation is the system allocator's; `scan` only reads a block before it
// is freed, and `realloc` copies into a fresh block of the requested layout before it
// frees the old one, as `GlobalAlloc::realloc` may.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for WipeProbe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.scan(ptr, layout.size());
        // SAFETY: forwarded unchanged; `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Always move, so the old block is scanned as it is left behind.
        // SAFETY: `GlobalAlloc::realloc`'s contract makes this layout valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a valid, non-zero-sized layout (the contract again).
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            self.scan(ptr, layout.size());
            // SAFETY: `ptr` was allocated by `System` with `layout`.
            unsafe { System.dealloc(ptr, layout) };
        }
        new
    }
}
