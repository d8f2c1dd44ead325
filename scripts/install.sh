#!/usr/bin/env bash
# Installs a built kmsfs: scripts/install.sh BINARY [PREFIX] [SBINDIR]
# (DESTDIR is honoured, as `make install` passes it). Puts the binary in
# PREFIX/bin, the mount(8) helpers mount.kmsfs and mount.fuse.kmsfs in
# SBINDIR (mount(8) looks only in /sbin), man pages in PREFIX/share/man/man1,
# bash/zsh/fish completions from the CLI's own generator, and the systemd
# unit template in PREFIX/lib/systemd/system.
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$1
prefix=${2:-/usr/local}
sbindir=${3:-/sbin}
root=${DESTDIR:-}
install -d "$root$prefix/bin" "$root$sbindir" "$root$prefix/share/man/man1" \
    "$root$prefix/share/bash-completion/completions" "$root$prefix/share/zsh/site-functions" \
    "$root$prefix/share/fish/vendor_completions.d" "$root$prefix/lib/systemd/system"
install -m 0755 "$binary" "$root$prefix/bin/kmsfs"
for helper in mount.kmsfs mount.fuse.kmsfs; do
    ln -sf "$prefix/bin/kmsfs" "$root$sbindir/$helper"
done
install -m 0644 man/*.1 "$root$prefix/share/man/man1/"
"$binary" --generate-completion-script bash > "$root$prefix/share/bash-completion/completions/kmsfs"
"$binary" --generate-completion-script zsh > "$root$prefix/share/zsh/site-functions/_kmsfs"
"$binary" --generate-completion-script fish > "$root$prefix/share/fish/vendor_completions.d/kmsfs.fish"
sed "s|/usr/bin/kmsfs|$prefix/bin/kmsfs|g" packaging/systemd/kmsfs@.service > "$root$prefix/lib/systemd/system/kmsfs@.service"
echo "installed kmsfs into $root$prefix (helpers in $root$sbindir)"
