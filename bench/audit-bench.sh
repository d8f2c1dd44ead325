#!/usr/bin/env bash
# make bench-audit: what auditing costs.
#   1. audit records/s, group-committed (as a mount writes them) and one
#      transaction each (kmsfs-bench keymanager);
#   2. untar of the benchmark source tree on kmsfs with every file create
#      audited (the default) and with routine creates and opens not
#      recorded (--audit-opens off, a benchmark-only switch), REPS runs each,
#      medians and the ratio: the cost of auditing per file open/create.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
root=/dev/shm/kmsfs-audit-bench
K="$PWD/.build/release/kmsfs"
tree=/var/cache/kmsfs-bench/linux-subset.tar
if [ ! -f "$tree" ]; then
    mkdir -p /var/cache/kmsfs-bench
    tmp=$(mktemp -d)
    tar -C "$tmp" -xJf /usr/src/linux-source-6.1.tar.xz --wildcards 'linux-source-6.1/fs/*' 'linux-source-6.1/kernel/*' \
        'linux-source-6.1/include/*' 'linux-source-6.1/lib/*' 'linux-source-6.1/mm/*' 'linux-source-6.1/net/*'
    tar -C "$tmp" -cf "$tree" linux-source-6.1
    rm -rf "$tmp"
fi
files=$(tar -tf "$tree" | grep -vc '/$')
cleanup() {
    grep -q " $root/mnt fuse" /proc/mounts 2>/dev/null && "$K" umount "$root/mnt" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

.build/release/kmsfs-bench keymanager | grep '^audit:'

untar() { # on|off → seconds
    rm -rf "$root"; mkdir -p "$root/cipher" "$root/mnt"
    echo "bench passphrase" > "$root/pw"
    "$K" init "$root/cipher" --passphrase-file "$root/pw" >/dev/null
    "$K" mount "$root/cipher" "$root/mnt" --passphrase-file "$root/pw" --audit-opens "$1"
    local t0 t1; t0=$(date +%s.%N)
    tar -C "$root/mnt" -xf "$tree"
    t1=$(date +%s.%N)
    records=$("$K" audit list --event GenerateDataKey --limit 100000000 --json --fs "$root/mnt" | grep -c '"seq"' || true)
    "$K" umount "$root/mnt"
    echo "$(echo "$t1 - $t0" | bc) $records"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
on=(); off=()
for _ in $(seq "$REPS"); do
    read -r s n < <(untar on); on+=("$s"); on_records=$n
    read -r s n < <(untar off); off+=("$s"); off_records=$n
done
m_on=$(printf '%s\n' "${on[@]}" | median)
m_off=$(printf '%s\n' "${off[@]}" | median)
echo "untar of $files files (median of $REPS): audited ${m_on} s ($on_records GenerateDataKey records), not audited ${m_off} s ($off_records records)"
echo "auditing costs $(echo "scale=1; 100 * ($m_on - $m_off) / $m_off" | bc)% of the untar; $(echo "scale=1; 1000000 * ($m_on - $m_off) / $files" | bc) µs per file"
