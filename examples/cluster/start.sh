#!/usr/bin/env bash
# Starts a cluster on loopback: three sso-server nodes (node-1, node-2, node-3 on
# https://localhost:7461, 7462, 7463) sharing one PostgreSQL database, with a dev PKI
# (docs/cluster.md). Ctrl-C stops what this script started (its own PIDs only) and removes
# its files.
#
#   bash examples/cluster/start.sh
#
# Which PostgreSQL, in this order:
# - SSO_PG_URL set (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB): that database, which must
#   exist and hold no store yet (ssoctl init refuses to overwrite one). The store's tables
#   stay in that database when the script stops; their rows are sealed under an unseal key
#   file that is deleted with the rest, so drop the database afterwards.
# - a PostgreSQL already running on this machine, found the way libpq tools find one:
#   PGHOST (a host name or a socket directory; default: the sockets /var/run/postgresql and
#   /tmp, then localhost), PGPORT (default 5432), PGUSER (default: the current user), with
#   pg_isready and psql from PATH or /usr/lib/postgresql/*/bin. It is used only when it
#   answers, the role logs in without a password (trust or peer: the nodes connect the same
#   way, as this user; PGPASSWORD and ~/.pgpass are ignored because the nodes would not
#   have them) and the role may create databases (CREATEDB or superuser). The script then
#   creates a NEW database with a random name (sso_cluster_<hex>), prints the server, the
#   role and the database, and drops that database at exit (it created it; it never writes
#   into a database that was there before). Otherwise it prints one line saying why not
#   (none answers; the role may not log in, e.g. root with no `root` role; the role may not
#   create databases) and falls back to:
# - a throwaway PostgreSQL: the server binaries of Debian's `postgresql` package
#   (/usr/lib/postgresql/*/bin, or $PG_BIN, or initdb on PATH), `initdb` in a new temporary
#   directory, listening only on a Unix socket inside that directory (no TCP port), run
#   as the `postgres` user (or `nobody` when there is none) through setpriv when this
#   script runs as root, since PostgreSQL refuses to run as root. Stopped and removed on
#   exit. fsync is off: it is thrown away anyway.
# SSO_NO_LOCAL_PG=1 skips the probe (always a throwaway PostgreSQL).
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
local_db=""
local_server=""
local_host=""
local_port=""
local_user=""
local_bin=""
# psql on the local server as the probed role, never with a password (see the header).
local_psql() {
    env -u PGPASSWORD -u PGSERVICE PGPASSFILE=/nonexistent/sso-no-pgpass \
        "$local_bin/psql" -X -q -A -t -w -v ON_ERROR_STOP=1 \
        -h "$local_host" -p "$local_port" -U "$local_user" -d postgres "$@" </dev/null
}
# Percent-encodes what a URL's user or host may not hold literally.
urlenc() {
    local s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [A-Za-z0-9._~-]) out+="$c" ;;
            *) out+="$(printf '%%%02X' "'$c")" ;;
        esac
    done
    printf '%s' "$out"
}
# One line saying why the local PostgreSQL is not used; answers non-zero.
no_local() { echo "$*: using a throwaway PostgreSQL instead"; return 1; }

# Sets url and local_db when a running local PostgreSQL answers and lets this role create
# a database; otherwise prints why not and answers non-zero.
probe_local_pg() {
    if command -v pg_isready >/dev/null 2>&1 && command -v psql >/dev/null 2>&1; then
        local_bin="$(dirname "$(command -v psql)")"
        [ -x "$local_bin/pg_isready" ] || local_bin=""
    fi
    if [ -z "$local_bin" ]; then
        local_bin="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)"
    fi
    [ -n "$local_bin" ] && [ -x "$local_bin/pg_isready" ] && [ -x "$local_bin/psql" ] ||
        { no_local "no local PostgreSQL probed (no pg_isready and psql on PATH or in /usr/lib/postgresql)"; return 1; }
    local_port="${PGPORT:-5432}"
    local_user="${PGUSER:-$(id -un)}"
    local hosts h
    if [ -n "${PGHOST:-}" ]; then hosts=("$PGHOST"); else hosts=(/var/run/postgresql /tmp localhost); fi
    local_host=""
    for h in "${hosts[@]}"; do
        if "$local_bin/pg_isready" -q -t 3 -h "$h" -p "$local_port" </dev/null >/dev/null 2>&1; then
            local_host="$h"
            break
        fi
    done
    [ -n "$local_host" ] || { no_local "no running local PostgreSQL answers (${hosts[*]}, port $local_port)"; return 1; }
    local_server="$local_host:$local_port"
    local may err
    if ! may="$(local_psql -c 'SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user' 2>&1)"; then
        err="$(printf '%s' "$may" | head -1)"
        no_local "the running PostgreSQL at $local_server does not let role $local_user in without a password ($err)"
        return 1
    fi
    [ "$may" = t ] || { no_local "role $local_user may not create databases on the running PostgreSQL at $local_server"; return 1; }
    local name
    name="sso_cluster_$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    if ! err="$(local_psql -c "CREATE DATABASE \"$name\"" 2>&1)"; then
        no_local "cannot create a database on the running PostgreSQL at $local_server as $local_user ($(printf '%s' "$err" | head -1))"
        return 1
    fi
    local_db="$name"
    url="postgresql://$(urlenc "$local_user")@$(urlenc "$local_host"):$local_port/$local_db"
    echo "using the running PostgreSQL at $local_server as role $local_user: created database $local_db (dropped at exit)"
}

work="$(mktemp -d "${TMPDIR:-/tmp}/sso-cluster.XXXXXX")"

# Stops the nodes (SIGTERM, then waits for each), then the throwaway PostgreSQL, then
# removes both directories. Runs once, on any exit.
cleanup() {
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "$local_db" ]; then
        # Ours: created by this script under a random name. The nodes are stopped; FORCE
        # ends any connection left (PostgreSQL 13 and later), plain DROP otherwise.
        if local_psql -c "DROP DATABASE IF EXISTS \"$local_db\" WITH (FORCE)" >/dev/null 2>&1 ||
            local_psql -c "DROP DATABASE IF EXISTS \"$local_db\"" >/dev/null 2>&1; then
            echo "dropped database $local_db on $local_server"
        else
            echo "could not drop database $local_db on $local_server: drop it by hand" >&2
        fi
    fi
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
elif [ -z "${SSO_NO_LOCAL_PG:-}" ] && probe_local_pg; then
    :
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
    "$pgbin/psql" -X -q -h "$pgdir" -p 5432 -U postgres -d postgres -c 'CREATE DATABASE sso' </dev/null
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

Ctrl-C stops the three nodes${pgdir:+ and PostgreSQL}${local_db:+, drops database $local_db} and removes $work${pgdir:+ and $pgdir}.
MSG
wait
