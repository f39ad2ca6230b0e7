#!/usr/bin/env bash
# The cluster (issue 14) through the real client, on the one-command example
# (examples/cluster/start.sh: three nodes on a throwaway PostgreSQL):
#   1. keyring fetch throughput with 1, 2 and 3 nodes in the client's endpoint list, as a
#      ratio to 1 node (interleaved rounds, median of per-round ratios);
#   2. a rotation on node 1 reaching 1,000 watching clients spread over the 3 nodes:
#      p50/p99/max (target p99 < 1 s from the rotate's answer).
# Release binaries, built once into target/test-bins (the tests' target directory).
#
#   bash bench/cluster.sh [--clients 32 --seconds 3 --rounds 5 --watchers 1000 --rotations 5]
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_DIR=target/test-bins cargo build --release -q --workspace --bins
target/test-bins/release/sso-cluster-bench "$@"
