#!/usr/bin/env bash
# Failover under load: a pair on loopback, clients sealing and opening (and one fetching
# the keyring over the network every 20 ms), SIGKILL of the node they all prefer.
# Prints failed operations, the latency spike, a cold client's time to its first key from
# the survivor, and draws docs/failover-timeline.svg.
#
#   bash bench/failover.sh [--before 3 --after 5 --clients 4]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tests --bin sso-failover
exec target/release/sso-failover --out docs/failover-timeline.svg "$@"
