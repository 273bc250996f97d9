#!/bin/sh
# Builds the .deb: the release binary, the man pages and shell completions
# that binary generates from its own --help, then `cargo deb` packs them with
# the assets listed in Cargo.toml ([package.metadata.deb]).
#
#   packaging/deb.sh            # -> target/debian/modelcache_<version>_<arch>.deb
#
# Extra arguments go to `cargo deb` (e.g. --output DIR).
set -eu
cd "$(dirname "$0")/.."

cargo=${CARGO:-cargo}
if ! "$cargo" deb --version >/dev/null 2>&1; then
    echo "deb.sh: cargo-deb is not installed; install it once with: cargo install cargo-deb" >&2
    exit 1
fi
"$cargo" build --release
# cargo deb maps target/release/ to the real target directory; the generated
# pages live at a fixed place it reads as given.
target_dir=${CARGO_TARGET_DIR:-target}
rm -rf target/generated
"$target_dir/release/modelcache" generate target/generated
exec "$cargo" deb --no-build "$@"
