#!/usr/bin/env bash
# make bench: the workloads of DESIGN.md §11 on kmsfs, gocryptfs and a
# plaintext FUSE passthrough (libfuse's passthrough_ll), in one run, on the
# same tmpfs backing store. Prints medians of REPS (default 5) interleaved runs,
# kmsfs ÷ gocryptfs and kmsfs ÷ plain.
# Needs root (drop_caches) and the Debian packages gocryptfs, libfuse3-dev and
# linux-source-6.1 (installed by `make bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
FILESYSTEMS=${FILESYSTEMS:-plain gocryptfs kmsfs}
CHUNK=${KMSFS_BENCH_CHUNK:-}
# KMSFS_MOUNT_ARGS: extra arguments for `kmsfs mount` (e.g. "--threads 2").
root=/dev/shm/kmsfs-bench
K="${KMSFS_BIN:-$PWD/.build/release/kmsfs}"  # KMSFS_BIN: compare another build
cache=/var/cache/kmsfs-bench
mkdir -p "$cache"

# The source tree: fs, kernel, include, lib, mm and net of Debian's linux-source-6.1.
tree="$cache/linux-subset.tar"
if [ ! -f "$tree" ]; then
    src=$(ls /usr/src/linux-source-6.1.tar.xz)
    tmp=$(mktemp -d)
    tar -C "$tmp" -xJf "$src" --wildcards 'linux-source-6.1/fs/*' 'linux-source-6.1/kernel/*' 'linux-source-6.1/include/*' \
        'linux-source-6.1/lib/*' 'linux-source-6.1/mm/*' 'linux-source-6.1/net/*'
    tar -C "$tmp" -cf "$tree" linux-source-6.1
    rm -rf "$tmp"
fi
files=$(tar -tf "$tree" | grep -vc '/$')

# libfuse's reference passthrough, built from the Debian example.
pt="$cache/passthrough_ll"
if [ ! -x "$pt" ]; then
    gcc -O2 -o "$pt" /usr/share/doc/libfuse3-dev/examples/passthrough_ll.c $(pkg-config --cflags --libs fuse3)
fi

cleanup() {
    for m in "$root"/*/mnt; do grep -q " $m fuse" /proc/mounts 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m"; }; done
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$root"; mkdir -p "$root"
echo "bench passphrase" > "$root/pw"

mount_fs() { # name → mounts $root/name/mnt
    local name=$1 dir="$root/$1"
    mkdir -p "$dir/cipher" "$dir/mnt"
    case $name in
        kmsfs)     "$K" init "$dir/cipher" --passphrase-file "$root/pw" ${CHUNK:+--chunk-size $CHUNK} >/dev/null
                   "$K" mount "$dir/cipher" "$dir/mnt" --passphrase-file "$root/pw" ${KMSFS_MOUNT_ARGS:-} ;;
        gocryptfs) gocryptfs -q -init -extpass "cat $root/pw" "$dir/cipher" >/dev/null
                   gocryptfs -q -extpass "cat $root/pw" "$dir/cipher" "$dir/mnt" ;;
        plain)     "$pt" -o source="$dir/cipher" "$dir/mnt" ;;
    esac
}
unmount_fs() { fusermount3 -u "$root/$1/mnt"; rm -rf "$root/$1"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }

declare -A result
run() { # fs workload → seconds
    local fs=$1 w=$2 m="$root/$1/mnt" t0 t1
    case $w in
        write128k) t0=$(now); dd if=/dev/zero of="$m/zero" bs=131072 count=2000 conv=fsync status=none; t1=$(now) ;;
        read128k)  drop; t0=$(now); dd if="$m/zero" of=/dev/null bs=131072 status=none; t1=$(now) ;;
        write1m)   t0=$(now); dd if=/dev/zero of="$m/zero1m" bs=1M count=250 conv=fsync status=none; t1=$(now) ;;
        read1m)    drop; t0=$(now); dd if="$m/zero1m" of=/dev/null bs=1M status=none; t1=$(now) ;;
        untar)     t0=$(now); tar -C "$m" -xf "$tree"; sync; t1=$(now) ;;
        md5)       drop; t0=$(now); (cd "$m" && find linux-source-6.1 -type f -print0 | xargs -0 md5sum >/dev/null); t1=$(now) ;;
        lsR)       drop; t0=$(now); ls -lR "$m" >/dev/null; t1=$(now) ;;
        rand4k)    head -c 64M /dev/urandom > "$m/rand" 2>/dev/null; drop
                   t0=$(now); python3 - "$m/rand" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR); rng = random.Random(7); size = 64 << 20
for i in range(4000):
    off = rng.randrange(0, size // 4096) * 4096
    if i % 2: os.pwrite(fd, os.urandom(4096), off)
    else: os.pread(fd, 4096, off)
os.fsync(fd); os.close(fd)
PY
                   t1=$(now) ;;
        rmrf)      t0=$(now); rm -rf "$m/linux-source-6.1"; t1=$(now) ;;
    esac
    echo "$t1 - $t0" | bc -l
}

workloads="write128k read128k write1m read1m untar md5 lsR rmrf rand4k"
echo "kmsfs filesystem benchmark: $REPS runs each, medians; backing store tmpfs; tree: $files files"
echo "kmsfs $($K --help >/dev/null 2>&1 && echo release build) chunk ${CHUNK:-default}; $(gocryptfs -version 2>/dev/null | head -1)"
# Repetitions interleave the filesystems (plain, gocryptfs, kmsfs, plain, …),
# so a drift in the machine's speed during the run touches all of them alike.
for rep in $(seq 1 "$REPS"); do
    for fs in $FILESYSTEMS; do
        mount_fs "$fs"
        for w in $workloads; do result["$fs,$w,$rep"]=$(run "$fs" "$w"); done
        unmount_fs "$fs"
    done
done

python3 - "$REPS" "$files" <<PY
import statistics, sys
reps = int(sys.argv[1]); files = int(sys.argv[2])
raw = """$(for k in "${!result[@]}"; do echo "$k ${result[$k]}"; done)"""
data = {}
for line in raw.split("\n"):
    if not line.strip(): continue
    key, value = line.split()
    fs, w, rep = key.split(",")
    data.setdefault((fs, w), []).append(float(value))
mb = {"write128k": 2000 * 131072, "read128k": 2000 * 131072, "write1m": 250 << 20, "read1m": 250 << 20}
rows = ["write128k", "read128k", "write1m", "read1m", "untar", "md5", "lsR", "rmrf", "rand4k"]
names = {"write128k": "stream write 128K (MB/s)", "read128k": "stream read 128K (MB/s)", "write1m": "stream write 1M (MB/s)",
         "read1m": "stream read 1M (MB/s)", "untar": "untar (s)", "md5": "md5sum tree (s)", "lsR": "ls -lR (s)",
         "rmrf": "rm -rf (s)", "rand4k": "random 4K r/w x4000 (s)"}
present = [fs for fs in ("plain", "gocryptfs", "kmsfs") if (fs, "untar") in data]
print(f"{'workload':28} " + " ".join(f"{fs:>10}" for fs in present) + ("  kmsfs/gocryptfs       kmsfs/plain" if len(present) == 3 else ""))
for w in rows:
    med = {fs: statistics.median(data[(fs, w)]) for fs in present}
    val = {fs: mb[w] / med[fs] / 1e6 for fs in med} if w in mb else med
    line = f"{names[w]:28} " + " ".join(f"{val[fs]:10.2f}" for fs in present)
    if len(present) == 3:
        ratio = val["kmsfs"] / val["gocryptfs"] if w in mb else med["kmsfs"] / med["gocryptfs"]
        line += f"  {ratio:5.2f} " + ("throughput" if w in mb else "time      ")
        vs_plain = val["kmsfs"] / val["plain"] if w in mb else med["kmsfs"] / med["plain"]
        line += f"  {vs_plain:5.2f} " + ("throughput" if w in mb else "time")
    print(line)
PY
