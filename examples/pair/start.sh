#!/usr/bin/env bash
# Starts a failover pair on loopback with a dev PKI: node-a on https://localhost:7443,
# node-b on https://localhost:7453. Node A starts with a first key and a backup; node B
# starts empty and receives everything by replication. Ctrl-C stops both.
#
#   bash examples/pair/start.sh
set -euo pipefail
# Where cargo puts binaries: honours CARGO_TARGET_DIR and .cargo/config.toml.
target_dir() { cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'; }
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
(cd "$root" && cargo build --release -q -p sso-server -p ssoctl)
bin="$(cd "$root" && target_dir)/release"
data="$here/data"

if [ ! -f "$data/node-a/store.db" ]; then
    "$bin/ssoctl" certs init --dir "$data/pki"
    "$bin/ssoctl" certs issue --dir "$data/pki" --role peer --name node-a
    "$bin/ssoctl" certs issue --dir "$data/pki" --role peer --name node-b
    mkdir -p "$data/node-a" "$data/node-b"
    umask 077
    head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$data/backup-password"
    "$bin/ssoctl" init --store "$data/node-a/store.db" --node node-a --key-file "$data/node-a/unseal.key" \
        --backup-out "$data/node-a-first.ssob" --password-file "$data/backup-password" --hint "data/backup-password"
    "$bin/ssoctl" init --join --store "$data/node-b/store.db" --node node-b --key-file "$data/node-b/unseal.key"
fi

"$bin/sso-server" --config "$here/node-a.toml" >"$data/node-a.out" 2>"$data/node-a.log" &
a=$!
"$bin/sso-server" --config "$here/node-b.toml" >"$data/node-b.out" 2>"$data/node-b.log" &
b=$!
trap 'kill $a $b 2>/dev/null; wait' EXIT INT TERM
for _ in $(seq 100); do
    grep -q listening "$data/node-a.out" 2>/dev/null && grep -q listening "$data/node-b.out" 2>/dev/null && break
    sleep 0.1
done
cat <<MSG
pair running: node-a https://localhost:7443 (pid $a), node-b https://localhost:7453 (pid $b)
logs in $data/node-*.log

  export SSOCTL_SERVER=https://localhost:7443,https://localhost:7453
  export SSOCTL_CA=$data/pki/ca.pem SSOCTL_CERT=$data/pki/admin.pem SSOCTL_KEY=$data/pki/admin-key.pem
  $bin/ssoctl status
  $bin/ssoctl rotate
  curl --cacert $data/pki/ca.pem --cert $data/pki/client.pem --key $data/pki/client-key.pem https://localhost:7453/v1/keyring

Ctrl-C stops both nodes.
MSG
wait
