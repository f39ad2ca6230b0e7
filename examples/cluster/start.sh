#!/usr/bin/env bash
# Starts a cluster on loopback: three sso-server nodes (node-1, node-2, node-3 on
# https://localhost:7461, 7462, 7463) sharing one PostgreSQL database, with a dev PKI
# (docs/cluster.md). Ctrl-C stops what this script started (its own PIDs only) and removes
# its files.
#
#   bash examples/cluster/start.sh
#
# Which PostgreSQL:
# - SSO_PG_URL set (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB): that database, which must
#   exist and hold no store yet (ssoctl init refuses to overwrite one). This is how to use
#   a PostgreSQL already running on this machine: the script does not probe the default
#   port or socket for one, because it cannot know which role and database it may write
#   into. The store's tables stay in that database when the script stops; their rows are
#   sealed under an unseal key file that is deleted with the rest, so drop the database
#   afterwards.
# - otherwise a throwaway PostgreSQL: the server binaries of Debian's `postgresql` package
#   (/usr/lib/postgresql/*/bin, or $PG_BIN, or initdb on PATH), `initdb` in a new temporary
#   directory, listening only on a Unix socket inside that directory (no TCP port), run
#   as the `postgres` user (or `nobody` when there is none) through setpriv when this
#   script runs as root, since PostgreSQL refuses to run as root. Stopped and removed on
#   exit. fsync is off: it is thrown away anyway.
#
# Environment:
#   SSO_BIN_DIR        directory with prebuilt sso-server and ssoctl (default: cargo build
#                      --release, then the target directory's release/)
#   SSO_CLUSTER_PORTS  the three nodes' HTTPS ports (default "7461 7462 7463"); metrics
#                      ports are chosen by the kernel and printed
#
# Everything else (PKI, unseal key, configs, logs, audit logs, the first backup) lives in a
# temporary directory printed at start and removed at exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
read -r -a ports <<<"${SSO_CLUSTER_PORTS:-7461 7462 7463}"
[ "${#ports[@]}" -eq 3 ] || { echo "SSO_CLUSTER_PORTS must name three ports" >&2; exit 64; }

if [ -n "${SSO_BIN_DIR:-}" ]; then
    bin="$SSO_BIN_DIR"
else
    # Where cargo puts binaries: honours CARGO_TARGET_DIR and .cargo/config.toml.
    (cd "$root" && cargo build --release -q -p sso-server -p ssoctl)
    bin="$(cd "$root" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
fi
for b in sso-server ssoctl; do
    [ -x "$bin/$b" ] || { echo "no $b in $bin" >&2; exit 69; }
done

pids=()
pgdir=""
pgbin=""
run_pg() { "$@"; }
work="$(mktemp -d "${TMPDIR:-/tmp}/sso-cluster.XXXXXX")"

# Stops the nodes (SIGTERM, then waits for each), then the throwaway PostgreSQL, then
# removes both directories. Runs once, on any exit.
cleanup() {
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "$pgdir" ]; then
        if [ -f "$pgdir/data/postmaster.pid" ]; then
            run_pg "$pgbin/pg_ctl" stop -D "$pgdir/data" -m fast -w -t 30 >/dev/null 2>&1 || true
        fi
        rm -rf "$pgdir"
    fi
    rm -rf "$work"
    echo "cluster stopped; removed $work${pgdir:+ and $pgdir}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${SSO_PG_URL:-}" ]; then
    url="$SSO_PG_URL"
    echo "using the PostgreSQL named by SSO_PG_URL"
else
    if [ -n "${PG_BIN:-}" ]; then
        pgbin="$PG_BIN"
    else
        pgbin="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)"
        [ -n "$pgbin" ] || pgbin="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
    fi
    [ -x "$pgbin/initdb" ] && [ -x "$pgbin/pg_ctl" ] || {
        echo "no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql package, or set SSO_PG_URL to a database to use" >&2
        exit 69
    }
    pgdir="$(mktemp -d "${TMPDIR:-/tmp}/sso-pg.XXXXXX")"
    if [ "$(id -u)" -eq 0 ]; then
        pguser=postgres
        id -u "$pguser" >/dev/null 2>&1 || pguser=nobody
        chown "$pguser:$(id -g "$pguser")" "$pgdir"
        run_pg() { setpriv --reuid="$pguser" --regid="$(id -g "$pguser")" --clear-groups -- "$@"; }
    fi
    run_pg "$pgbin/initdb" -D "$pgdir/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >"$pgdir/initdb.log" 2>&1 || {
        cat "$pgdir/initdb.log" >&2
        exit 70
    }
    cat >>"$pgdir/data/postgresql.auto.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$pgdir'
port = 5432
fsync = off
CONF
    run_pg "$pgbin/pg_ctl" start -D "$pgdir/data" -l "$pgdir/log" -w -t 60 >/dev/null || {
        tail -20 "$pgdir/log" >&2
        exit 70
    }
    "$pgbin/psql" -X -q -h "$pgdir" -U postgres -d postgres -c 'CREATE DATABASE sso' </dev/null
    # The socket directory as the URL's host, percent-encoded.
    url="postgresql://postgres@$(printf '%s' "$pgdir" | sed 's|/|%2F|g')/sso"
    echo "throwaway PostgreSQL in $pgdir (pid $(head -1 "$pgdir/data/postmaster.pid"), socket only)"
fi

umask 077
"$bin/ssoctl" certs init --dir "$work/pki" >/dev/null
head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/backup-password"
"$bin/ssoctl" init --store "$url" --node node-1 --key-file "$work/unseal.key" \
    --backup-out "$work/first.ssob" --password-file "$work/backup-password" --hint "backup-password" >/dev/null

for i in 1 2 3; do
    cat >"$work/node-$i.toml" <<TOML
node = "node-$i"
listen = "127.0.0.1:${ports[$((i - 1))]}"
metrics_listen = "127.0.0.1:0"

[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"

[store]
path = "$url"
unseal = { key_file = "unseal.key" }

[audit]
path = "node-$i.audit.log"

[roles]
client = ["cn:client"]
admin = ["cn:admin"]
TOML
    "$bin/sso-server" --config "$work/node-$i.toml" >"$work/node-$i.out" 2>"$work/node-$i.log" &
    pids+=($!)
done

for _ in $(seq 300); do
    up=0
    for i in 1 2 3; do grep -q listening "$work/node-$i.out" 2>/dev/null && up=$((up + 1)); done
    [ "$up" -eq 3 ] && break
    for p in "${pids[@]}"; do
        kill -0 "$p" 2>/dev/null || { echo "a node exited at start; its log:" >&2; tail -5 "$work"/node-*.log >&2; exit 70; }
    done
    sleep 0.1
done
[ "$up" -eq 3 ] || { echo "the nodes did not start within 30 s" >&2; exit 70; }

endpoints="https://localhost:${ports[0]},https://localhost:${ports[1]},https://localhost:${ports[2]}"
cat <<MSG
cluster running in $work
  node-1 https://localhost:${ports[0]} (pid ${pids[0]}), node-2 https://localhost:${ports[1]} (pid ${pids[1]}), node-3 https://localhost:${ports[2]} (pid ${pids[2]})
  $(cat "$work"/node-*.out | tr '\n' ' ')
logs in $work/node-*.log

  export SSOCTL_SERVER=$endpoints
  export SSOCTL_CA=$work/pki/ca.pem SSOCTL_CERT=$work/pki/admin.pem SSOCTL_KEY=$work/pki/admin-key.pem
  $bin/ssoctl status
  $bin/ssoctl rotate
  curl --cacert $work/pki/ca.pem --cert $work/pki/client.pem --key $work/pki/client-key.pem https://localhost:${ports[2]}/v1/keyring

Ctrl-C stops the three nodes${pgdir:+ and PostgreSQL} and removes $work${pgdir:+ and $pgdir}.
MSG
wait
