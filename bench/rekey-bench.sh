#!/usr/bin/env bash
# make bench-rekey: how fast a live mount moves files to a new key.
#   rewrap    — FILES small files, header-only: files/s
#   reencrypt — SIZE_MB of large files, every chunk re-sealed: MB/s, as a
#               share of the same mount's streaming write throughput
# each idle and with a concurrent streaming writer (dd), whose own loss is
# reported too. tmpfs backing store, release build.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-5000}
SIZE_MB=${SIZE_MB:-512}
WORKERS=${WORKERS:-2}
root=/dev/shm/kmsfs-rekey-bench
K="$PWD/.build/release/kmsfs"
cleanup() {
    grep -q " $root/mnt fuse" /proc/mounts 2>/dev/null && "$K" umount "$root/mnt" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$root"; mkdir -p "$root/cipher" "$root/mnt"
echo "bench passphrase" > "$root/pw"
"$K" init "$root/cipher" --passphrase-file "$root/pw" >/dev/null
"$K" mount "$root/cipher" "$root/mnt" --passphrase-file "$root/pw"
M="$root/mnt"
now() { date +%s.%N; }

# Streaming write alone: MB/s (dd 1 MiB blocks).
stream() { # MB → MB/s
    local t0 t1; t0=$(now)
    dd if=/dev/zero of="$M/stream" bs=1M count="$1" conv=fsync status=none
    t1=$(now); rm -f "$M/stream"
    echo "scale=1; $1 / ($t1 - $t0)" | bc
}

# Runs a rekey job to the end; prints "files/s MB/s" from its own status.
rekey() { # mode from to
    "$K" rekey start --key "$2" --to "$3" --mode "$1" --workers "$WORKERS" --fs "$M" >/dev/null
    while :; do
        state=$("$K" rekey status --json --fs "$M")
        case $(echo "$state" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job"]["state"])') in
            done) break ;; running|queued) sleep 0.2 ;; *) echo "rekey failed: $state" >&2; exit 1 ;;
        esac
    done
    echo "$state" | python3 -c '
import json, sys
from datetime import datetime
j = json.load(sys.stdin)["job"]
at = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
t = at(j["finishedAt"]) - at(j["createdAt"])
print("%.0f %.1f" % (j["filesDone"] / t, j["bytesDone"] / t / 1e6))'
}

"$K" key create --alias alias/b --fs "$M" >/dev/null
echo "setting up: $FILES small files, $SIZE_MB MB of large files"
mkdir -p "$M/small" "$M/large"
python3 - "$M/small" "$FILES" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(f"{d}/f{i}", "wb") as f: f.write(os.urandom(4096))
PY
for i in $(seq 1 $((SIZE_MB / 64))); do dd if=/dev/urandom of="$M/large/f$i" bs=1M count=64 status=none; done

idle_write=$(stream 512)
read -r rw_idle _ < <(rekey rewrap alias/default alias/b)
read -r _ re_idle < <(rekey reencrypt alias/b alias/default)

# The same with a writer streaming alongside.
stream 2048 > "$root/writer1" & writer=$!
read -r rw_busy _ < <(rekey rewrap alias/default alias/b)
read -r _ re_busy < <(rekey reencrypt alias/b alias/default)
wait $writer
busy_write=$(cat "$root/writer1")

echo
printf "%-38s %10s %10s\n" "" "idle" "with writer"
printf "%-38s %10s %10s\n" "rewrap (files/s, target >= 2000)" "$rw_idle" "$rw_busy"
printf "%-38s %10s %10s\n" "reencrypt (MB/s)" "$re_idle" "$re_busy"
printf "%-38s %10s %10s\n" "streaming write of the mount (MB/s)" "$idle_write" "$busy_write"
echo
echo "reencrypt ÷ streaming write: $(echo "scale=2; $re_idle / $idle_write" | bc) (target >= 0.50)"
echo "writer's loss while a rekey runs: $(echo "scale=0; 100 - 100 * $busy_write / $idle_write" | bc)%"
