#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 5) each, starting from the seed corpus
# in fuzz/seeds/. cargo-fuzz wants a nightly toolchain: with one installed, the targets run
# under AddressSanitizer; without one (rustup cannot fetch toolchains on this project's
# machines), they run on the stable toolchain with RUSTC_BOOTSTRAP=1 and no sanitizer,
# which still finds panics, overflows and hangs. Nothing is skipped: a target that cannot
# be built or run fails the smoke run.
set -uo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-5}"

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
    run_flags=()
    mode="nightly, AddressSanitizer"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    run_flags=(--sanitizer none)
    mode="stable with RUSTC_BOOTSTRAP=1, no sanitizer (no nightly toolchain installed)"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: installing cargo-fuzz from crates.io"
    if ! cargo install cargo-fuzz --locked --quiet; then
        echo "fuzz smoke: FAILED: cargo-fuzz could not be installed" >&2
        exit 1
    fi
fi

targets=$("${fuzz[@]}" list)
if [ -z "$targets" ]; then
    echo "fuzz smoke: FAILED: cargo fuzz list found no targets" >&2
    exit 1
fi
echo "fuzz smoke: $(echo "$targets" | wc -w) targets, ${seconds}s each ($mode)"

failed=0
for target in $targets; do
    mkdir -p "corpus/$target"
    seeds=()
    [ -d "seeds/$target" ] && seeds=("seeds/$target")
    log="${TMPDIR:-/tmp}/fuzz-$target.log"
    if ! "${fuzz[@]}" run "${run_flags[@]}" "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
        echo "fuzz smoke: $target FAILED; last lines of $log:"
        tail -30 "$log"
        failed=1
        continue
    fi
    runs=$(grep -E 'Done [0-9]+ runs' "$log" | tail -1)
    if [ -z "$runs" ]; then
        echo "fuzz smoke: $target FAILED: libFuzzer did not report its runs; last lines of $log:"
        tail -30 "$log"
        failed=1
        continue
    fi
    echo "fuzz smoke: $target: $runs"
done
exit $failed
