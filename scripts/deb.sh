#!/usr/bin/env bash
# Builds a Debian package of a built kmsfs: scripts/deb.sh BINARY [OUTDIR].
# The files are the ones `make install` puts (scripts/install.sh with
# PREFIX=/usr and the mount helpers in /sbin), man pages gzipped as Debian
# wants them. Depends: what dpkg-shlibdeps finds for the shared libraries the
# binary loads (libfuse3, libssl3, libsqlite3, libc, ...) and fuse3 for
# fusermount3. `make deb` links the Swift runtime in statically, so every
# library comes from a Debian package; one that does not (a Swift runtime in
# /opt/swift) is an error unless KMSFS_DEB_ALLOW_UNPACKAGED=1 (the test
# packages a debug build that way, on a machine that has that runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$(readlink -f "$1")
out=$(readlink -f "${2:-.}")
version=$("$binary" --version | head -1 | awk '{print $2}')
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage="$work/kmsfs_${version}_$arch"
DESTDIR="$stage" scripts/install.sh "$binary" /usr /sbin >/dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1
install -d "$stage/usr/share/doc/kmsfs"
gzip -9nc README.md > "$stage/usr/share/doc/kmsfs/README.md.gz"

# dpkg-shlibdeps reads a source package's control file; a minimal one will do.
mkdir -p "$work/src/debian"
printf 'Source: kmsfs\n\nPackage: kmsfs\nArchitecture: any\n' > "$work/src/debian/control"
ignore=()
if [ "${KMSFS_DEB_ALLOW_UNPACKAGED:-0}" = 1 ]; then ignore=(--ignore-missing-info); fi
unowned=$(ldd "$binary" | awk '/=> \// {print $3}' | while read -r lib; do
    dpkg -S "$lib" >/dev/null 2>&1 || dpkg -S "/usr$lib" >/dev/null 2>&1 || echo "$lib"
done)
if [ -n "$unowned" ] && [ ${#ignore[@]} -eq 0 ]; then
    echo "deb: these libraries belong to no Debian package (build with --static-swift-stdlib, as make deb does):" >&2
    echo "$unowned" >&2
    exit 1
fi
shlibs=$(cd "$work/src" && dpkg-shlibdeps -O "${ignore[@]}" "$binary" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
depends="${shlibs:+$shlibs, }fuse3"

size=$(du -sk "$stage" | cut -f1)
install -d "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: kmsfs
Version: $version
Architecture: $arch
Maintainer: kmsfs developers <kmsfs@localhost>
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Description: encrypted FUSE filesystem with a built-in key manager
 kmsfs encrypts everything written through its mount with AES-256-GCM under
 per-file data keys wrapped by versioned master keys, kept in a local
 keystore, AWS KMS or a PKCS#11 token, with rotation, policies, re-keying
 and a tamper-evident audit log.
CONTROL
dpkg-deb --root-owner-group --build "$stage" "$out/kmsfs_${version}_$arch.deb" >/dev/null
echo "$out/kmsfs_${version}_$arch.deb (Depends: $depends)"
