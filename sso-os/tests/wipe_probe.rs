//! The probe itself: it must count a block freed with the marker in it (else every wipe
//! test using it would pass for nothing), and not count one wiped first.
#![forbid(unsafe_code)]

use sso_os::wipe_probe::WipeProbe;
use zeroize::Zeroize;

const MARKER: &[u8; 32] = b"\x5c\x81probe-marker-not-by-chance\x03\xa7\xe1\x42";

#[global_allocator]
static PROBE: WipeProbe = WipeProbe::new(MARKER);

#[test]
fn a_block_freed_with_the_marker_is_counted_and_a_wiped_one_is_not() {
    PROBE.arm();
    let mut kept = Vec::with_capacity(64);
    kept.extend_from_slice(MARKER);
    drop(std::hint::black_box(kept));
    assert!(PROBE.disarm() >= 1, "an unwiped block went unnoticed");

    PROBE.arm();
    let mut wiped = Vec::with_capacity(64);
    wiped.extend_from_slice(MARKER);
    wiped.zeroize();
    drop(std::hint::black_box(wiped));
    assert_eq!(PROBE.disarm(), 0, "a wiped block was counted");

    // A reallocation leaves the old block behind: counted when unwiped.
    PROBE.arm();
    let mut grown = Vec::with_capacity(32);
    grown.extend_from_slice(MARKER);
    grown.reserve(4096);
    let grown = std::hint::black_box(grown);
    assert!(PROBE.disarm() >= 1, "the block a reallocation left was not scanned");
    drop(grown);
}
