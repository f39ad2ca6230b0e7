#!/usr/bin/env bash
# Measures sso-server's GET /v1/keyring (audit on) against Debian's nginx answering a
# 32-byte body over mTLS TLS 1.3 (a static file and `return 200`), with the same load
# generator (sso-bench), keep-alive and one-full-handshake-per-request, in one run, and
# prints the ratios. Everything listens on 127.0.0.1 only and stops by itself.
#
# Two modes, both run by default, each with its own servers and ratios:
#   shared  everything on both cores (nginx with 2 workers), as before;
#   pinned  sso-server and nginx (1 worker) on core 0 and the generator (1 thread) on
#           core 1, with taskset, so the server under test never competes with the
#           generator for a core.
# The CPU/request ratio is nginx's CPU per request over sso-server's (higher is better
# for sso-server): 1.2x means sso-server spends 1/1.2 of nginx's CPU on a request.
#
#   bash bench/vs-nginx.sh            # both modes, 10 s per case, 32 connections
#   MODES=pinned DURATION=5 CONNECTIONS=16 bash bench/vs-nginx.sh
#   SSO_SERVER_BIN=/tmp/old-sso-server MODES=pinned bash bench/vs-nginx.sh   # another build
set -euo pipefail
# Where cargo puts binaries: honours CARGO_TARGET_DIR and .cargo/config.toml.
target_dir() { cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'; }
cd "$(dirname "$0")/.."
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-32}"
MODES="${MODES:-shared pinned}"
SSO_PORT=7443
NGINX_PORT="${NGINX_PORT:-7543}"

if ! command -v nginx >/dev/null; then
    echo "installing nginx (Debian package)"
    apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null
fi
if [[ "$MODES" == *pinned* ]] && [ "$(nproc)" -lt 2 ]; then
    echo "pinned mode needs two cores"; exit 1
fi
cargo build --release -q -p sso-server -p tests --bin sso-server --bin sso-bench
BIN="$(realpath "$(target_dir)")/release"
# The sso-server under test: this tree's release build, or SSO_SERVER_BIN (for example a
# copy of the binary from before a change, to measure before and after back to back).
SSO_BIN="${SSO_SERVER_BIN:-$BIN/sso-server}"

work=$(mktemp -d)
sso_pid=""
stop_servers() {
    [ -n "$sso_pid" ] && kill "$sso_pid" 2>/dev/null || true
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    sleep 0.5
    sso_pid=""
}
cleanup() {
    stop_servers
    rm -rf "$work"
}
trap cleanup EXIT

# CPU time (clock ticks) used so far by a server: sso-server's process, or nginx's master
# and workers. CPU per request is the server's own cost, whatever the generator does.
cpu_ticks() {
    local pids
    if [ "$1" = sso ]; then pids="$sso_pid"; else
        local master; master=$(cat "$work/nginx.pid"); pids="$master $(pgrep -P "$master" | tr '\n' ' ')"
    fi
    local total=0
    for p in $pids; do
        read -r -a f <"/proc/$p/stat"
        total=$((total + f[13] + f[14]))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

run_mode() { # shared | pinned
    local mode=$1 server_cpus="" gen_cpus="" workers=2 threads=2
    if [ "$mode" = pinned ]; then server_cpus="taskset -c 0"; gen_cpus="taskset -c 1"; workers=1; threads=1; fi
    local out="$work/$mode"
    mkdir -p "$out"
    # The server, in dev mode in its scratch directory (PKI, store and audit log on).
    (cd "$out" && exec $server_cpus "$SSO_BIN" --dev sso-dev >"$out/sso.out" 2>"$out/sso.log") &
    sso_pid=$!
    for _ in $(seq 100); do grep -q "listening" "$out/sso.out" 2>/dev/null && break; sleep 0.1; done
    grep -q "listening" "$out/sso.out" || { echo "sso-server did not start"; cat "$out/sso.log"; exit 1; }
    local dev="$out/sso-dev"

    # nginx with the same certificates: TLS 1.3 only, client certificate required, no
    # session resumption (as sso-server), one worker per core it may use.
    mkdir -p "$out/www" "$out/logs"
    # nginx workers run unprivileged: let them read the scratch directory and the file.
    chmod 755 "$work" "$out" "$out/www"
    printf '0123456789abcdef0123456789abcdef' >"$out/www/static"
    cat >"$out/nginx.conf" <<CONF
worker_processes $workers;
pid $work/nginx.pid;
error_log $out/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        ssl_certificate $dev/server.pem;
        ssl_certificate_key $dev/server-key.pem;
        ssl_client_certificate $dev/ca.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        location = /static { alias $out/www/static; default_type application/octet-stream; }
        location = /return { return 200 "0123456789abcdef0123456789abcdef"; }
    }
}
CONF
    $server_cpus nginx -c "$out/nginx.conf" -p "$out" -e "$out/logs/error.log"
    sleep 0.5
    echo "== $mode: sso-server and nginx ${server_cpus:-on all cores}, generator ${gen_cpus:-on all cores} ($threads thread(s)); nginx $workers worker(s)"
    echo "   affinity: sso-server $(taskset -pc "$sso_pid" | sed 's/.*: //'), nginx master $(taskset -pc "$(cat "$work/nginx.pid")" | sed 's/.*: //')"

    bench() { # label url mode server
        local before after
        before=$(cpu_ticks "$4")
        $gen_cpus "$BIN/sso-bench" "$2" --ca "$dev/ca.pem" --cert "$dev/client.pem" --key "$dev/client-key.pem" \
            -c "$CONNECTIONS" -d "$DURATION" --threads "$threads" --mode "$3" --label "$1" >"$out/last.txt"
        after=$(cpu_ticks "$4")
        local ok; ok=$(sed -nE 's/.*"ok":([0-9]+).*/\1/p' "$out/last.txt")
        local us; us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$ok" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print 0 }')
        echo "$1 cpu_us_per_req=$us" >>"$out/cpu.txt"
        cat "$out/last.txt" >>"$out/results.txt"
        echo "$(head -1 "$out/last.txt"); server CPU ${us} us/request"
    }
    echo "-- keep-alive, $CONNECTIONS connections, ${DURATION}s each"
    bench sso-keepalive "https://localhost:$SSO_PORT/v1/keyring" keepalive sso
    bench nginx-static-keepalive "https://localhost:$NGINX_PORT/static" keepalive nginx
    bench nginx-return-keepalive "https://localhost:$NGINX_PORT/return" keepalive nginx
    echo "-- one full mTLS handshake per request"
    bench sso-handshake "https://localhost:$SSO_PORT/v1/keyring" handshake sso
    bench nginx-static-handshake "https://localhost:$NGINX_PORT/static" handshake nginx
    echo "   audit entries written by sso-server: $(wc -l <"$dev/audit.log")"
    stop_servers
}

cpu() { grep "^$2 " "$work/$1/cpu.txt" | sed -E 's/.*=([0-9.]+)/\1/'; }
rps() { grep "\"label\":\"$2\"" "$work/$1/results.txt" | sed -E 's/.*"rps":([0-9.]+).*/\1/'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
line() { # mode what sso nginx target
    printf '%-8s %-34s req/s %s   CPU/request %s   (target %s)\n' "$1" "$2" \
        "$(ratio "$(rps "$1" "$3")" "$(rps "$1" "$4")")" "$(ratio "$(cpu "$1" "$4")" "$(cpu "$1" "$3")")" "$5"
}

for mode in $MODES; do run_mode "$mode"; done
echo "== ratios, sso-server over nginx (higher is better for sso-server; CPU/request = nginx's over sso-server's)"
for mode in $MODES; do
    target=">= 1.0x"; [ "$mode" = pinned ] && target=">= 1.2x"
    line "$mode" "keep-alive vs nginx return 200" sso-keepalive nginx-return-keepalive "$target"
    line "$mode" "keep-alive vs nginx static file" sso-keepalive nginx-static-keepalive "~1.5x"
    line "$mode" "full handshakes vs nginx static" sso-handshake nginx-static-handshake ">= 2x"
done
