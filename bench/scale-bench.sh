#!/usr/bin/env bash
# make bench-scale: does kmsfs stay flat as the tree grows? On a fresh mount
# (release build, tmpfs backing) for each size N in SIZES (default 1,000,
# 10,000 and 100,000; add 1000000 for the full run): create, stat and unlink
# N empty files in one directory and spread over a deep tree (8 levels, 100
# files per leaf), in microseconds per operation, and the daemon's resident
# memory per cached inode after the creates. Then OPEN files held open at
# once (memory per open file), and a STREAM_GIB sparse file filled and read
# back on disk-backed storage (/var/tmp), GiB by GiB, to show the rate does
# not fall with the offset. Needs root (drop_caches).
set -euo pipefail
cd "$(dirname "$0")/.."
K="${KMSFS_BIN:-$PWD/.build/release/kmsfs}"
SIZES=${SIZES:-"1000 10000 100000"}
OPEN=${OPEN:-10000}
STREAM_GIB=${STREAM_GIB:-20}
root=/dev/shm/kmsfs-scale
disk=/var/tmp/kmsfs-scale
cleanup() {
    for m in "$root/mnt" "$disk/mnt"; do
        grep -q " $m fuse" /proc/mounts 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m"; }
    done
    rm -rf "$root" "$disk"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fresh() { # DIR → a new filesystem mounted at DIR/mnt
    cleanup_one "$1"
    mkdir -p "$1/mnt"
    echo "scale bench passphrase" > "$1/pw"
    "$K" init "$1/cipher" --passphrase-file "$1/pw" --kdf-log-n 12 >/dev/null
    "$K" mount "$1/cipher" "$1/mnt" --passphrase-file "$1/pw"
}
cleanup_one() {
    grep -q " $1/mnt fuse" /proc/mounts 2>/dev/null && fusermount3 -u "$1/mnt"
    rm -rf "$1"
}
daemon() { pgrep -f "kmsfs mount $1/cipher" | head -1; }

ops() { # MOUNT N LAYOUT PID → one row: µs per create, stat, unlink; daemon memory per cached inode after the creates
    python3 - "$@" "$K" <<'PY'
import json, os, subprocess, sys, time
m, n, layout, pid, kmsfs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rss = lambda: int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
nodes = lambda: json.loads(subprocess.run([kmsfs, "status", "--json", "--fs", m], capture_output=True, text=True).stdout)["daemon"]["statistics"]["nodes"]
def path(i):
    if layout == "flat": return f"{m}/flat/f{i}"
    leaf = i // 100
    parts = [f"d{(leaf >> (3 * k)) & 7}" for k in range(7, -1, -1)]
    return f"{m}/deep/" + "/".join(parts) + f"/f{i}"
paths = [path(i) for i in range(n)]
for d in sorted({os.path.dirname(p) for p in paths}): os.makedirs(d, exist_ok=True)
before = rss()
t = time.perf_counter()
for p in paths: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
c = time.perf_counter() - t
grown, cached = rss() - before, nodes()
t = time.perf_counter()
for p in paths: os.stat(p)
s = time.perf_counter() - t
t = time.perf_counter()
for p in paths: os.unlink(p)
u = time.perf_counter() - t
print(f"{n:<8} {layout:<6} {c / n * 1e6:10.1f} {s / n * 1e6:10.1f} {u / n * 1e6:10.1f} {grown // max(cached, 1):>10} ({cached} cached)")
PY
}

printf '%-8s %-6s %10s %10s %10s %10s\n' files layout "create µs" "stat µs" "unlink µs" "B/inode"
for n in $SIZES; do
    for layout in flat deep; do
        fresh "$root"
        sync; echo 3 > /proc/sys/vm/drop_caches
        ops "$root/mnt" "$n" "$layout" "$(daemon "$root")"
    done
done

# Files held open at once: the daemon's memory per open file (OPEN=0 skips it).
[ "$OPEN" -gt 0 ] || exit 0
fresh "$root"
pid=$(daemon "$root")
python3 - "$root/mnt" "$OPEN" "$pid" <<'PY'
import os, sys
m, n, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rss = lambda: int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
os.makedirs(f"{m}/open")
for i in range(n): os.close(os.open(f"{m}/open/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
before = rss()
held = []
try:
    for i in range(n): held.append(os.open(f"{m}/open/f{i}", os.O_RDWR))
except OSError as e:
    print(f"opened {len(held)} of {n}: {e}")
print(f"{len(held)} files held open: {(rss() - before) / max(len(held), 1):.0f} bytes of daemon memory each")
for fd in held: os.close(fd)
PY

# A large file: sparse, then filled and read back GiB by GiB (disk-backed; STREAM_GIB=0 skips it).
[ "$STREAM_GIB" -gt 0 ] || exit 0
fresh "$disk"
python3 - "$disk/mnt/big" "$STREAM_GIB" <<'PY'
import os, sys, time
path, gib = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
os.ftruncate(fd, gib << 30)
block = os.urandom(1 << 20)
rates = []
for g in range(gib):
    t = time.perf_counter()
    for k in range(1024): os.pwrite(fd, block, (g << 30) + (k << 20))
    rates.append((1 << 30) / (time.perf_counter() - t) / 1e6)
os.fsync(fd); os.close(fd)
with open("/proc/sys/vm/drop_caches", "w") as f: f.write("3")
fd = os.open(path, os.O_RDONLY)
reads = []
for g in range(gib):
    t = time.perf_counter()
    for k in range(1024): os.pread(fd, 1 << 20, (g << 30) + (k << 20))
    reads.append((1 << 30) / (time.perf_counter() - t) / 1e6)
os.close(fd)
show = lambda r: " ".join(f"{x:.0f}" for x in r)
print(f"{gib} GiB sparse file filled, MB/s per GiB: {show(rates)}")
print(f"read back, MB/s per GiB: {show(reads)}")
print(f"last GiB / first GiB: write {rates[-1] / rates[0]:.2f}, read {reads[-1] / reads[0]:.2f}")
PY
