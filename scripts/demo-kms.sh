#!/usr/bin/env bash
# make demo-kms: a kmsfs key whose material stays in AWS KMS (moto's KMS in
# server mode on 127.0.0.1 stands in for AWS), end to end: create it, mount,
# write unaware, count the KMS calls, disable the key in KMS behind kmsfs's
# back and watch the mount refuse, enable it again; then a key generated
# inside a PKCS#11 token (SoftHSM), non-extractable. Leaves nothing running
# or mounted, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
K="$PWD/.build/debug/kmsfs"
work=$(mktemp -d /tmp/kmsfs-demo-kms.XXXXXX)
cipher="$work/cipher"; mnt="$work/mnt"; pw="$work/passphrase"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
moto=""
cleanup() {
    if grep -q " $mnt fuse.kmsfs" /proc/mounts 2>/dev/null; then fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"; fi
    # moto_server's SIGTERM handler ends only its main thread.
    if [ -n "$moto" ]; then kill -9 "$moto" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
kms() { "$K" "$@" --passphrase-file "$pw"; }
aws() { command aws --endpoint-url "$endpoint" --region us-east-1 "$@"; }
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
# The daemon reads the key's state in KMS every 60 s; 3 s keeps the demo short.
export KMSFS_EXTERNAL_POLL_SECONDS=3

# A SoftHSM token in the scratch directory; the daemon finds it through SOFTHSM2_CONF.
mkdir -p "$work/hsm/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/hsm/tokens" > "$work/hsm/softhsm2.conf"
export SOFTHSM2_CONF="$work/hsm/softhsm2.conf"
softhsm2-util --init-token --free --label demo-hsm --pin 2468 --so-pin 13579 >/dev/null
printf '2468\n' > "$work/hsm/pin"; chmod 600 "$work/hsm/pin"

step "1. An AWS KMS (moto, on $endpoint) and a symmetric key in it"
moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
disown "$moto"
for _ in $(seq 1 100); do python3 -c "import urllib.request; urllib.request.urlopen('$endpoint/')" 2>/dev/null && break; sleep 0.1; done
kid=$(aws kms create-key --description "kmsfs demo" --query KeyMetadata.KeyId --output text)
echo "AWS KMS key $kid"

step "2. A filesystem, and a kmsfs key whose material stays in AWS KMS"
openssl rand -base64 32 > "$pw"; chmod 600 "$pw"
mkdir -p "$mnt"
kms init "$cipher" >/dev/null
kms key create --alias alias/finance --provider aws-kms --external-key "$kid" --endpoint-url "$endpoint" --fs "$cipher" >/dev/null
kms key describe alias/finance --fs "$cipher" | sed -n 1,6p

step "3. Mount, bind /finance to it, write with ordinary tools"
kms mount "$cipher" "$mnt"
mkdir "$mnt/finance"
"$K" key bind /finance alias/finance --fs "$mnt"
for i in $(seq 1 300); do echo "invoice $i: $((i * 37)) EUR" > "$mnt/finance/invoice-$i.txt"; done
tar -C /usr/share/doc -cf - sqlite3 | tar -C "$mnt/finance" -xf -
cat "$mnt/finance/invoice-42.txt"
echo "files under /finance: $(find "$mnt/finance" -type f | wc -l)"
echo "KMS GenerateDataKey calls for them: $(sqlite3 "$cipher/.kmsfs/keystore.db" 'SELECT COUNT(*) FROM intermediate_keys') (one intermediate key, not one call per file)"

step "4. Disable the key in AWS KMS, behind kmsfs's back"
aws kms disable-key --key-id "$kid"
start=$(date +%s%N)
until ! cat "$mnt/finance/invoice-42.txt" >/dev/null 2>&1; do sleep 0.2; done
printf 'refused after %d ms: ' $(( ($(date +%s%N) - start) / 1000000 ))
cat "$mnt/finance/invoice-42.txt" 2>&1 || true
echo "new file: $(sh -c "echo x > '$mnt/finance/new.txt'" 2>&1 || true)"
"$K" audit list --fs "$mnt" | grep ExternalKeyStateChange | tail -1

step "5. Enable it again: the files open again"
aws kms enable-key --key-id "$kid"
until cat "$mnt/finance/invoice-42.txt" 2>/dev/null; do sleep 0.2; done

step "6. A key generated inside a PKCS#11 token (SoftHSM): data keys are wrapped inside the token"
"$K" key create --alias alias/hsm --provider pkcs11 --module /usr/lib/softhsm/libsofthsm2.so --token demo-hsm --pin-file "$work/hsm/pin" --fs "$mnt" >/dev/null
mkdir "$mnt/hsm"
"$K" key bind /hsm alias/hsm --fs "$mnt"
cp /etc/services "$mnt/hsm/services" && cmp /etc/services "$mnt/hsm/services" && echo "hsm/services written and read back identical"
pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label demo-hsm --login --pin 2468 --list-objects 2>/dev/null | sed -n '1,5p'

step "7. Unmount; moto stops"
kms umount "$mnt" 2>/dev/null || "$K" umount "$mnt"
echo "done"
