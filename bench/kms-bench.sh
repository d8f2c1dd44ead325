#!/usr/bin/env bash
# make bench-kms: what keeping a key's material in AWS KMS or a PKCS#11 token
# costs. One mount, three directories: /local under the keystore's own key,
# /kms under a key held in AWS KMS (moto's KMS in server mode on 127.0.0.1
# stands in; a real region adds network latency only to the calls counted
# below), /hsm under a key in a SoftHSM token (every data key wrapped inside
# the token: one C_Encrypt per create, one C_Decrypt per open). Interleaved
# repetitions, medians: creates per second (10,000 empty files from one
# Python loop) and untar of a source tree, kms ÷ local; and the KMS calls
# per 10,000 files (GenerateDataKey: intermediate keys made; Decrypt after
# a remount). Needs root (drop_caches) and the packages `make bench` installs.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
K="${KMSFS_BIN:-$PWD/.build/release/kmsfs}"
root=/dev/shm/kmsfs-kms-bench
cache=/var/cache/kmsfs-bench
tree="$cache/linux-subset.tar"
[ -f "$tree" ] || { echo "run make bench once first (it prepares $tree)"; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
moto=""
cleanup() {
    grep -q " $root/mnt fuse" /proc/mounts 2>/dev/null && { fusermount3 -u "$root/mnt" 2>/dev/null || fusermount3 -uz "$root/mnt"; }
    if [ -n "$moto" ]; then kill -9 "$moto" 2>/dev/null || true; fi
    rm -rf "$root"
}
export SOFTHSM2_CONF="$root/hsm/softhsm2.conf"
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$root"; mkdir -p "$root/cipher" "$root/mnt" "$root/hsm/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$root/hsm/tokens" > "$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label bench --pin 4321 --so-pin 8765 >/dev/null
echo 4321 > "$root/hsm/pin"; chmod 600 "$root/hsm/pin"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
disown "$moto"
for _ in $(seq 1 100); do python3 -c "import urllib.request; urllib.request.urlopen('$endpoint/')" 2>/dev/null && break; sleep 0.1; done
kid=$(aws --endpoint-url "$endpoint" kms create-key --query KeyMetadata.KeyId --output text)
echo "bench passphrase" > "$root/pw"
"$K" init "$root/cipher" --passphrase-file "$root/pw" >/dev/null
"$K" key create --alias alias/kms --provider aws-kms --external-key "$kid" --endpoint-url "$endpoint" --fs "$root/cipher" --passphrase-file "$root/pw" >/dev/null
"$K" key create --alias alias/strict --provider aws-kms --strict --external-key "$kid" --endpoint-url "$endpoint" --fs "$root/cipher" --passphrase-file "$root/pw" >/dev/null
"$K" key create --alias alias/hsm --provider pkcs11 --module /usr/lib/softhsm/libsofthsm2.so --token bench --pin-file "$root/hsm/pin" \
    --fs "$root/cipher" --passphrase-file "$root/pw" >/dev/null
"$K" mount "$root/cipher" "$root/mnt" --passphrase-file "$root/pw"
mkdir "$root/mnt/local" "$root/mnt/kms" "$root/mnt/strict" "$root/mnt/hsm"
"$K" key bind /hsm alias/hsm --fs "$root/mnt" >/dev/null
"$K" key bind /kms alias/kms --fs "$root/mnt" >/dev/null
"$K" key bind /strict alias/strict --fs "$root/mnt" >/dev/null
db="$root/cipher/.kmsfs/keystore.db"
intermediates() { sqlite3 "$db" 'SELECT COUNT(*) FROM intermediate_keys'; }
now() { date +%s.%N; }

creates() { # dir → seconds for 10,000 creates
    python3 - "$1" <<'PY'
import os, sys, time
d = sys.argv[1]; os.makedirs(d)
t0 = time.perf_counter()
for i in range(10000):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
print(time.perf_counter() - t0)
PY
}
untar() { local t0 t1; t0=$(now); tar -C "$1" -xf "$tree"; sync; t1=$(now); echo "$t1 - $t0" | bc; }
# The daemon keeps a descriptor per inode the kernel caches (20,000 may be all a
# container allows): let the kernel forget the last workload's inodes first.
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

declare -A times
before=$(intermediates)
for rep in $(seq 1 "$REPS"); do
    for where in local kms hsm; do
        drop
        times[creates-$where]+="$(creates "$root/mnt/$where/c$rep") "
        mkdir "$root/mnt/$where/t$rep"
        drop
        times[untar-$where]+="$(untar "$root/mnt/$where/t$rep") "
    done
done
files=$(( REPS * (10000 + $(tar -tf "$tree" | grep -vc '/$')) ))
made=$(( $(intermediates) - before ))
printf '%-26s %10s %10s %10s %12s %12s\n' workload local kms hsm "kms÷local" "hsm÷local"
for w in creates untar; do
    l=$(echo "${times[$w-local]}" | tr ' ' '\n' | grep . | median)
    k=$(echo "${times[$w-kms]}" | tr ' ' '\n' | grep . | median)
    h=$(echo "${times[$w-hsm]}" | tr ' ' '\n' | grep . | median)
    if [ $w = creates ]; then
        printf '%-26s %10.0f %10.0f %10.0f %12.2f %12.2f\n' "creates per second" "$(echo "10000 / $l" | bc -l)" "$(echo "10000 / $k" | bc -l)" \
            "$(echo "10000 / $h" | bc -l)" "$(echo "$l / $k" | bc -l)" "$(echo "$l / $h" | bc -l)"
    else
        printf '%-26s %10.2f %10.2f %10.2f %12.2f %12.2f\n' "untar (s; ratio = speed)" "$l" "$k" "$h" "$(echo "$l / $k" | bc -l)" "$(echo "$l / $h" | bc -l)"
    fi
done
# Strict mode: a KMS Encrypt per create (2,000 files, once).
strict=$(python3 - "$root/mnt/strict/c" <<'PY'
import os, sys, time
d = sys.argv[1]; os.makedirs(d)
t0 = time.perf_counter()
for i in range(2000):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
print(time.perf_counter() - t0)
PY
)
printf '%-26s %10s %10.0f %12.2f   (--strict: one KMS Encrypt per file, 2,000 files)\n' "creates per second, strict" "" "$(echo "2000 / $strict" | bc -l)" \
    "$(echo "(2000 / $strict) / (10000 / $(echo "${times[creates-local]}" | tr ' ' '\n' | grep . | median))" | bc -l)"
echo "files created under the KMS key: $files; GenerateDataKey calls: $made ($(echo "scale=2; $made * 10000 / $files" | bc) per 10,000 files)"
# Reading everything back after a remount: one Decrypt per intermediate key.
"$K" umount "$root/mnt"
"$K" mount "$root/cipher" "$root/mnt" --passphrase-file "$root/pw"
drop
t0=$(now); find "$root/mnt/kms/t1" -type f -print0 | xargs -0 cat > /dev/null; t1=$(now)
echo "read back the first untarred tree ($(tar -tf "$tree" | grep -vc "/$") files) under the KMS key in $(echo "$t1 - $t0" | bc) s after a remount; the intermediate keys they need are unwrapped once each (one KMS Decrypt, then cached 5 min)"
