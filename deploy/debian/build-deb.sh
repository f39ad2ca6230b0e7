#!/usr/bin/env bash
# Builds the Debian package: release binaries, man pages and completions rendered from
# the binaries' own command lines (sso-dist), then `cargo deb` with the metadata in
# dist/Cargo.toml. The package lands in TARGET/debian/sso_VERSION-1_ARCH.deb; arguments
# go to cargo deb (e.g. --fast). Needs cargo-deb (`cargo install cargo-deb --locked`).
#
# SSO_DEB_PROFILE (default release) and SSO_DEB_PREBUILT=1 (the binaries, sso-dist
# included, are already in TARGET/PROFILE) let tests/tests/package.rs package the test
# binaries through this same script.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "error: cargo-deb is not installed" >&2
    echo "hint: cargo install cargo-deb --locked" >&2
    exit 69
fi
profile=${SSO_DEB_PROFILE:-release}
target=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ "${SSO_DEB_PREBUILT:-0}" != 1 ]; then
    cargo build --profile "$profile" --locked --workspace --bins
fi
out="$target/$profile/dist"
rm -rf "$out"
"$target/$profile/sso-dist" assets "$out"
# Debian policy: man pages compressed with gzip -9, without a timestamp (-n).
gzip -9n "$out"/man/*.8
cargo deb --locked --no-build --profile "$profile" -p sso-dist -o "$target/debian" "$@"
