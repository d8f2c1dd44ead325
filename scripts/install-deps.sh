#!/usr/bin/env bash
# Installs the Debian packages kmsfs builds, tests and benchmarks with, when
# any is missing. Safe to run again: it does nothing when all are present.
set -euo pipefail
packages=(pkg-config libssl-dev openssl libsqlite3-dev sqlite3 fuse3 libfuse3-dev attr git python3 util-linux
          libp11-kit-dev softhsm2 opensc dpkg-dev "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The AWS KMS API for the external-key tests: moto in server mode and the AWS
# CLI, from PyPI (Debian 12's own python3 is "externally managed": then
# --break-system-packages, as these are test tools, not system ones).
if ! command -v moto_server >/dev/null || ! command -v aws >/dev/null; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    echo "installing from PyPI: moto[server] awscli"
    python3 -m pip install --quiet 'moto[server]' awscli 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages 'moto[server]' awscli
fi
