#!/usr/bin/env bash
# Measures sso-server's GET /v1/keyring (audit on) against Debian's nginx answering a
# 32-byte body over mTLS TLS 1.3 (a static file and `return 200`), with the same load
# generator (sso-bench), keep-alive and one-full-handshake-per-request, in one run, and
# prints the ratios. Everything listens on 127.0.0.1 only and stops by itself.
#
#   bash bench/vs-nginx.sh            # 10 s per case, 32 connections
#   DURATION=5 CONNECTIONS=16 bash bench/vs-nginx.sh
set -euo pipefail
# Where cargo puts binaries: honours CARGO_TARGET_DIR and .cargo/config.toml.
target_dir() { cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'; }
cd "$(dirname "$0")/.."
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-32}"
SSO_PORT=7443
NGINX_PORT="${NGINX_PORT:-7543}"

if ! command -v nginx >/dev/null; then
    echo "installing nginx (Debian package)"
    apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null
fi
cargo build --release -q -p sso-server -p tests --bin sso-server --bin sso-bench
BIN="$(target_dir)/release"

work=$(mktemp -d)
cleanup() {
    [ -n "${sso_pid:-}" ] && kill "$sso_pid" 2>/dev/null || true
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$work"
}
trap cleanup EXIT

# The server, in dev mode in the scratch directory (PKI, store and audit log on).
(cd "$work" && exec "$OLDPWD/$BIN/sso-server" --dev sso-dev >"$work/sso.out" 2>"$work/sso.log") &
sso_pid=$!
for _ in $(seq 100); do grep -q "listening" "$work/sso.out" 2>/dev/null && break; sleep 0.1; done
grep -q "listening" "$work/sso.out" || { echo "sso-server did not start"; cat "$work/sso.log"; exit 1; }
dev="$work/sso-dev"

# nginx with the same certificates: TLS 1.3 only, client certificate required, no
# session resumption (as sso-server), 2 workers (the machine's cores).
mkdir -p "$work/www" "$work/logs"
# nginx workers run unprivileged: let them read the scratch directory and the file.
chmod 755 "$work" "$work/www"
printf '0123456789abcdef0123456789abcdef' >"$work/www/static"
cat >"$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/logs/error.log warn;
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
        location = /static { alias $work/www/static; default_type application/octet-stream; }
        location = /return { return 200 "0123456789abcdef0123456789abcdef"; }
    }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" -e "$work/logs/error.log"
sleep 0.5

# CPU time (clock ticks) used so far by a server: sso-server's process, or nginx's master
# and workers. The load generator shares the machine's two cores, so requests/s alone is
# partly a measure of the generator; CPU per request is the server's own cost.
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

bench() { # label url mode server
    local before after
    before=$(cpu_ticks "$4")
    "$BIN/sso-bench" "$2" --ca "$dev/ca.pem" --cert "$dev/client.pem" --key "$dev/client-key.pem" \
        -c "$CONNECTIONS" -d "$DURATION" --mode "$3" --label "$1" >"$work/last.txt"
    after=$(cpu_ticks "$4")
    local ok; ok=$(sed -nE 's/.*"ok":([0-9]+).*/\1/p' "$work/last.txt")
    local us; us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$ok" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print 0 }')
    echo "$1 cpu_us_per_req=$us" >>"$work/cpu.txt"
    cat "$work/last.txt" >>"$work/results.txt"
    echo "$(head -1 "$work/last.txt"); server CPU ${us} us/request"
}
cpu() { grep "^$1 " "$work/cpu.txt" | sed -E 's/.*=([0-9.]+)/\1/'; }
rps() { grep "\"label\":\"$1\"" "$work/results.txt" | sed -E 's/.*"rps":([0-9.]+).*/\1/'; }

echo "== keep-alive, $CONNECTIONS connections, ${DURATION}s each"
bench sso-keepalive "https://localhost:$SSO_PORT/v1/keyring" keepalive sso
bench nginx-static-keepalive "https://localhost:$NGINX_PORT/static" keepalive nginx
bench nginx-return-keepalive "https://localhost:$NGINX_PORT/return" keepalive nginx
echo "== one full mTLS handshake per request"
bench sso-handshake "https://localhost:$SSO_PORT/v1/keyring" handshake sso
bench nginx-static-handshake "https://localhost:$NGINX_PORT/static" handshake nginx

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
line() { # what sso nginx target
    printf '%-34s req/s %s   CPU/request %s   (target %s)\n' "$1" \
        "$(ratio "$(rps "$2")" "$(rps "$3")")" "$(ratio "$(cpu "$3")" "$(cpu "$2")")" "$4"
}
echo "== ratios, sso-server over nginx (higher is better for sso-server)"
line "keep-alive vs nginx return 200" sso-keepalive nginx-return-keepalive ">= 1.0x"
line "keep-alive vs nginx static file" sso-keepalive nginx-static-keepalive "~1.5x"
line "full handshakes vs nginx static" sso-handshake nginx-static-handshake ">= 2x"
echo "audit entries written by sso-server: $(wc -l <"$dev/audit.log")"
