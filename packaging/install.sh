#!/bin/sh
# Installs modelcache for the user who runs it (no root needed, except to
# install the fuse3 package when fusermount3 is missing):
#
#   ~/.local/bin/modelcache                       the binary, built with cargo
#   ~/.config/systemd/user/modelcache@.service    the user unit
#   ~/.config/modelcache/manifest.toml            a commented manifest, only if none exists
#   ~/.local/share/doc/modelcache/                README and example manifests
#   ~/.local/share/modelcache/installed-files     what was installed, for --uninstall
#
# (~/.config is $XDG_CONFIG_HOME when that is set.) With --prefix DIR nothing
# is written outside DIR: DIR/bin, DIR/share/systemd/user, DIR/share/doc,
# DIR/share/modelcache, and the manifest in DIR/etc/modelcache, which the
# unit then names with --manifest.
#
# Running it again updates what it installed and keeps the manifest.
# --uninstall removes exactly the files and directories the record lists;
# the manifest only if it is unchanged since it was installed.

set -eu

me=install.sh

say() { printf '%s: %s\n' "$me" "$*"; }
warn() { printf '%s: warning: %s\n' "$me" "$*" >&2; }
die() {
    printf '%s: %s\n' "$me" "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
usage: $me [--prefix DIR] [--binary PATH] [--no-fuse] [--uninstall]

Installs modelcache for the current user: the binary in ~/.local/bin, the
systemd user unit modelcache@.service, a commented manifest in
~/.config/modelcache/manifest.toml (only if none exists) and the docs.

  --prefix DIR    install everything under DIR instead (nothing outside it)
  --binary PATH   install this modelcache binary instead of building one
                  with \`cargo build --release\`
  --no-fuse       do not install the fuse3 package when fusermount3 is missing
  --uninstall     remove what a previous run installed (with the same
                  --prefix); a manifest you have edited is kept
EOF
}

prefix=''
binary=''
uninstall=''
fuse=1
while [ $# -gt 0 ]; do
    case $1 in
        --prefix)
            [ $# -ge 2 ] || die "--prefix needs a directory"
            prefix=$2
            shift
            ;;
        --prefix=*) prefix=${1#--prefix=} ;;
        --binary)
            [ $# -ge 2 ] || die "--binary needs the path of a modelcache binary"
            binary=$2
            shift
            ;;
        --binary=*) binary=${1#--binary=} ;;
        --no-fuse) fuse='' ;;
        --uninstall) uninstall=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument: $1 (see $me --help)" ;;
    esac
    shift
done

# The source tree this script belongs to: the unit, manifests and docs come
# from there.
src=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$src/packaging/systemd/modelcache@.service" ] ||
    die "cannot find packaging/systemd/modelcache@.service next to this script; run it from the modelcache source tree"

[ -n "${HOME:-}" ] || die "HOME is not set"
case $HOME in
    /*) ;;
    *) die "HOME ($HOME) is not an absolute path" ;;
esac
# As the daemon does: a relative XDG_CONFIG_HOME is ignored.
config=${XDG_CONFIG_HOME:-}
case $config in
    /*) ;;
    *) config=$HOME/.config ;;
esac

custom_prefix=$prefix
if [ -n "$custom_prefix" ]; then
    case $prefix in
        /*) ;;
        *) prefix=$(pwd)/$prefix ;;
    esac
    bindir=$prefix/bin
    unitdir=$prefix/share/systemd/user
    confdir=$prefix/etc/modelcache
else
    prefix=$HOME/.local
    bindir=$prefix/bin
    unitdir=$config/systemd/user
    confdir=$config/modelcache
fi
docdir=$prefix/share/doc/modelcache
# man finds $prefix/share/man for $prefix/bin in PATH; bash-completion and
# fish look in these folders of ~/.local/share (or the prefix's share);
# zsh only in folders named in its fpath.
mandir=$prefix/share/man/man1
bashdir=$prefix/share/bash-completion/completions
zshdir=$prefix/share/zsh/site-functions
fishdir=$prefix/share/fish/vendor_completions.d
datadir=$prefix/share/modelcache
record=$datadir/installed-files
manifest=$confdir/manifest.toml
bin_dest=$bindir/modelcache

# The record holds one path per line, and the unit names the binary (and
# the manifest) unquoted: keep to characters that need no escaping there.
for path in "$bin_dest" "$manifest"; do
    case $path in
        *[!A-Za-z0-9._/@+=,:~-]*)
            die "$path: only letters, digits and ._/@+=,:~- are supported in install paths (the systemd unit names them unquoted); choose a --prefix without others"
            ;;
    esac
done

# A file being written (next to its destination), and the record being
# built; if we stop half-way the first is removed and the second merged
# into the record, so that --uninstall still finds everything installed.
tmp=''
new_record=''
generated=''
cleanup() {
    [ -z "$tmp" ] || rm -f "$tmp"
    [ -z "$generated" ] || rm -rf "$generated"
    if [ -n "$new_record" ] && [ -f "$new_record" ]; then
        cat "$record" "$new_record" 2>/dev/null | LC_ALL=C sort -u >"$new_record.merged" &&
            mv -f "$new_record.merged" "$record"
        rm -f "$new_record" "$new_record.merged"
    fi
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

checksum() { cksum <"$1" | awk '{ print $1 "-" $2 }'; }

# ---- uninstall ----

if [ -n "$uninstall" ]; then
    if [ ! -f "$record" ]; then
        say "nothing to uninstall: no record of an installation at $record (installed with another --prefix?)"
        exit 0
    fi
    # Instances still enabled would be left pointing at a removed unit.
    for link in "$config"/systemd/user/*.wants/modelcache@*.service; do
        [ -L "$link" ] || continue
        unit=$(basename "$link")
        warn "$unit is still enabled; stop and disable it with: systemctl --user disable --now '$unit'"
    done
    dirs=$(sed -n 's/^d //p' "$record" | LC_ALL=C sort -r)
    kept=''
    while IFS= read -r line; do
        kind=${line%% *}
        rest=${line#* }
        case $kind in
            f)
                if [ -e "$rest" ] || [ -L "$rest" ]; then
                    rm -f "$rest"
                    say "removed $rest"
                fi
                ;;
            m)
                sum=${rest%% *}
                path=${rest#* }
                [ -f "$path" ] || continue
                if [ "$(checksum "$path")" = "$sum" ]; then
                    rm -f "$path"
                    say "removed $path"
                else
                    kept=$path
                    say "kept $path: it was edited since it was installed (remove it yourself if you no longer want it)"
                fi
                ;;
        esac
    done <"$record"
    if [ -z "$kept" ] && [ -e "$manifest" ]; then
        kept=$manifest
        say "kept $manifest: this installation did not create it"
    fi
    rm -f "$record"
    # Directories this script created, deepest first, if nothing else is in them.
    printf '%s\n' "$dirs" | while IFS= read -r dir; do
        [ -z "$dir" ] || rmdir "$dir" 2>/dev/null || true
    done
    say "uninstalled modelcache${kept:+ (kept your manifest $kept)}"
    exit 0
fi

# ---- install ----

if [ "$(id -u)" = 0 ] && [ -z "$custom_prefix" ]; then
    warn "running as root: this installs for root's own user services. To install for yourself, run it as yourself (it asks sudo only to install fuse3); for a system-wide install use the .deb"
fi

run_as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Non-root mounts go through the setuid fusermount3 (package fuse3).
if command -v fusermount3 >/dev/null 2>&1; then
    :
elif [ -z "$fuse" ]; then
    warn "fusermount3 was not found; modelcache cannot mount as a normal user until the fuse3 package is installed"
else
    if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
        die "fusermount3 was not found and sudo is not available: install the fuse3 package as root, then run $me again (or pass --no-fuse)"
    fi
    if command -v apt-get >/dev/null 2>&1; then
        set -- apt-get install -y fuse3
    elif command -v dnf >/dev/null 2>&1; then
        set -- dnf install -y fuse3
    elif command -v pacman >/dev/null 2>&1; then
        set -- pacman -S --needed --noconfirm fuse3
    elif command -v zypper >/dev/null 2>&1; then
        set -- zypper --non-interactive install fuse3
    else
        die "fusermount3 was not found, and neither apt-get, dnf, pacman nor zypper: install your distribution's fuse3 package, then run $me again"
    fi
    say "fusermount3 was not found: installing fuse3 as root: $*"
    if ! run_as_root "$@"; then
        # A fresh Debian or Ubuntu may not have its package lists yet.
        if [ "$1" != apt-get ] || ! run_as_root apt-get update || ! run_as_root "$@"; then
            die "installing fuse3 failed: install it by hand, then run $me again"
        fi
    fi
    command -v fusermount3 >/dev/null 2>&1 ||
        die "fuse3 is installed but fusermount3 is not in PATH ($PATH)"
fi

# Distributions package old toolchains (Debian 12's cargo is 1.63): say so
# before a build fails on the edition or a dependency.
rustup_hint="install a current toolchain with rustup (https://rustup.rs: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh), open a new shell, then run $me again"
check_cargo() {
    need=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' "$src/Cargo.toml")
    [ -n "$need" ] || die "Cargo.toml has no rust-version line"
    have=$(cargo --version 2>/dev/null | awk '{ print $2 }')
    [ -n "$have" ] || die "\`cargo --version\` failed: $rustup_hint"
    older=$(printf '%s\n%s\n' "$have" "$need" | awk -F. '
        NR == 1 { split($0, h, ".") }
        NR == 2 { split($0, n, ".")
            for (i = 1; i <= 3; i++) {
                if ((h[i] + 0) < (n[i] + 0)) { print "yes"; exit }
                if ((h[i] + 0) > (n[i] + 0)) { print "no"; exit }
            }
            print "no" }')
    [ "$older" = no ] ||
        die "cargo $have is too old: modelcache needs Rust $need or newer; $rustup_hint (or pass --binary PATH)"
}

if [ -z "$binary" ]; then
    command -v cargo >/dev/null 2>&1 ||
        die "cargo was not found: modelcache is built with Rust; $rustup_hint (or pass --binary PATH)"
    check_cargo
    say "building: cargo build --release (in $src)"
    (cd "$src" && cargo build --release) ||
        die "cargo build --release failed (above); fix that, or pass --binary PATH"
    target=${CARGO_TARGET_DIR:-target}
    case $target in
        /*) ;;
        *) target=$src/$target ;;
    esac
    binary=$target/release/modelcache
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    die "$binary is not an executable file"
fi
version=$("$binary" --version 2>/dev/null) ||
    die "$binary does not run (\`$binary --version\` failed)"
case $version in
    "modelcache "*) ;;
    *) die "$binary is not modelcache (its --version says: $version)" ;;
esac

# Creates DIR and any missing parents, recording each one created.
make_dir() {
    d=$1
    while [ ! -d "$d" ]; do
        printf 'd %s\n' "$d" >>"$new_record"
        d=$(dirname "$d")
    done
    mkdir -p "$1"
}

# Moves the finished temporary file $tmp to DEST with mode MODE (a rename,
# so a running daemon's binary is replaced, not overwritten in place).
commit() {
    chmod "$2" "$tmp"
    mv -f "$tmp" "$1"
    tmp=''
    printf 'f %s\n' "$1" >>"$new_record"
    say "installed $1"
}

# Directories an earlier run created stay ours; the record lists them again.
new_record=$(dirname "$record")/.installed-files.new.$$
# Its own directory may not exist yet: record it before creating it.
parent=$(dirname "$record")
if [ -f "$record" ]; then
    mkdir -p "$parent"
    grep '^d ' "$record" >"$new_record" || true
else
    missing=''
    d=$parent
    while [ ! -d "$d" ]; do
        missing="$missing$d
"
        d=$(dirname "$d")
    done
    mkdir -p "$parent"
    printf '%s' "$missing" | sed 's/^/d /' >"$new_record"
fi
for dir in "$bindir" "$unitdir" "$confdir" "$docdir" "$mandir" "$bashdir" "$zshdir" "$fishdir"; do
    make_dir "$dir"
done

tmp=$bin_dest.new.$$
cp "$binary" "$tmp"
commit "$bin_dest" 755

# The unit names the installed binary (the .deb's copy keeps /usr/bin), and
# under --prefix the manifest installed there.
exec_start="ExecStart=$bin_dest mount"
[ -z "$custom_prefix" ] || exec_start="$exec_start --manifest $manifest"
tmp=$unitdir/modelcache@.service.new.$$
sed "s|^ExecStart=/usr/bin/modelcache mount |$exec_start |" \
    "$src/packaging/systemd/modelcache@.service" >"$tmp"
grep -qxF "$exec_start %f" "$tmp" ||
    die "packaging/systemd/modelcache@.service has no line 'ExecStart=/usr/bin/modelcache mount %f' to adapt"
commit "$unitdir/modelcache@.service" 644

for doc in README.md mount/manifest.comfyui.toml mount/manifest.example.toml; do
    tmp=$docdir/$(basename "$doc").new.$$
    cp "$src/$doc" "$tmp"
    commit "$docdir/$(basename "$doc")" 644
done

# Man pages and completions, made by the binary from its own definitions.
generated=$(mktemp -d "${TMPDIR:-/tmp}/modelcache-install.XXXXXX")
"$bin_dest" generate "$generated" || die "$bin_dest generate failed (above)"
for page in "$generated"/man1/*.1; do
    tmp=$mandir/$(basename "$page").new.$$
    cp "$page" "$tmp"
    commit "$mandir/$(basename "$page")" 644
done
for pair in "modelcache.bash $bashdir/modelcache" "_modelcache $zshdir/_modelcache" \
    "modelcache.fish $fishdir/modelcache.fish"; do
    dest=${pair#* }
    tmp=$dest.new.$$
    cp "$generated/completions/${pair%% *}" "$tmp"
    commit "$dest" 644
done
rm -rf "$generated"
generated=''

# The manifest is the user's: created once, never replaced. The record keeps
# its checksum as installed, so --uninstall can tell whether it was edited.
if [ -e "$manifest" ]; then
    say "kept $manifest (it already exists)"
    if [ -f "$record" ]; then
        while IFS= read -r line; do
            case $line in
                "m "*) [ "${line#m * }" != "$manifest" ] || printf '%s\n' "$line" >>"$new_record" ;;
            esac
        done <"$record"
    fi
else
    tmp=$manifest.new.$$
    cp "$src/mount/manifest.comfyui.toml" "$tmp"
    chmod 644 "$tmp"
    mv -f "$tmp" "$manifest"
    tmp=''
    printf 'm %s %s\n' "$(checksum "$manifest")" "$manifest" >>"$new_record"
    say "installed $manifest: a commented starting point; after editing it, check it with: modelcache check $manifest --root ~/ComfyUI/models"
fi

# Sorted, so that the same installation always leaves the same record.
LC_ALL=C sort -u "$new_record" >"$record"
rm -f "$new_record"
new_record=''

say "installed $version"
if [ -z "$custom_prefix" ]; then
    # Let a running user manager see the new or updated unit.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --user daemon-reload >/dev/null 2>&1 || true
    fi
    case ":$PATH:" in
        *":$bindir:"*) ;;
        *) warn "$bindir is not in PATH: add it (e.g. in ~/.profile) to run modelcache by name" ;;
    esac
    case ":${FPATH:-}:" in
        *":$zshdir:"*) ;;
        *) [ "$(basename "${SHELL:-}")" != zsh ] || say "zsh completions: add $zshdir to fpath (fpath+=($zshdir) in ~/.zshrc, before compinit)" ;;
    esac
    cat <<EOF

Check this machine:  modelcache doctor ~/ComfyUI/models
Mount your ComfyUI models folder now and at every login:
  systemctl --user enable --now "modelcache@\$(systemd-escape --path ~/ComfyUI/models).service"
or only until you stop it, in a terminal:
  modelcache mount ~/ComfyUI/models
Then see what it holds:  modelcache status   (and: man modelcache)
Remove it again with: $0 --uninstall
EOF
fi
