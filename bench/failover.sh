#!/usr/bin/env bash
# Failover under load: a pair on loopback, clients sealing and opening (and one fetching
# the keyring over the network every 20 ms), then the node they all prefer fails, twice:
#   1. SIGKILL (docs/failover-timeline.svg)
#   2. SIGSTOP, a hung node that accepts connections and never answers
#      (docs/failover-timeline-hang.svg)
# Each run prints failed operations, the latency spike, the longest keyring fetch after the
# fault (target < 1 s), how long a watching client takes to see a rotation made on the other
# node (target < 3 s), and a cold client's time to its first key from the survivor.
#
#   bash bench/failover.sh [--before 3 --after 5 --clients 4]
set -euo pipefail
cd "$(dirname "$0")/.."
# Where cargo puts binaries: honours CARGO_TARGET_DIR and .cargo/config.toml.
target_dir() { cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'; }
cargo build --release -q -p tests --bin sso-failover
bin="$(target_dir)/release"
"$bin/sso-failover" --fault kill --out docs/failover-timeline.svg "$@"
"$bin/sso-failover" --fault hang --out docs/failover-timeline-hang.svg "$@"
