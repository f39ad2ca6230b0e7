#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 5) each, starting from the seed corpus
# in fuzz/seeds/. Needs a nightly toolchain and cargo-fuzz; says so plainly and exits 0
# when the machine has neither, so the rest of CI still means something.
set -uo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-5}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz smoke: SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: installing cargo-fuzz from crates.io"
    if ! cargo install cargo-fuzz --locked >/dev/null 2>&1; then
        echo "fuzz smoke: SKIPPED: cargo-fuzz could not be installed"
        exit 0
    fi
fi

targets=$(cargo +nightly fuzz list)
failed=0
for target in $targets; do
    mkdir -p "corpus/$target"
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    echo "fuzz smoke: $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 >"/tmp/fuzz-$target.log" 2>&1; then
        echo "fuzz smoke: $target FAILED; last lines:"
        tail -30 "/tmp/fuzz-$target.log"
        failed=1
    else
        grep -E '^#[0-9]+.*DONE|Done [0-9]+ runs' "/tmp/fuzz-$target.log" | tail -1
    fi
done
exit $failed
