# kmsfs — the two commands a fresh Debian machine needs: `make demo` and `make test`.
SWIFT ?= swift
export PATH := /opt/swift/usr/bin:$(PATH)

.PHONY: all deps build release install deb test demo demo-kms man bench bench-kms bench-scale bench-cipher bench-keys bench-rekey bench-audit clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

## Installs the release build: binary, mount(8) helpers, man pages, completions, systemd unit.
PREFIX ?= /usr/local
SBINDIR ?= /sbin
install: release
	scripts/install.sh .build/release/kmsfs $(PREFIX) $(SBINDIR)

## A Debian package, kmsfs_VERSION_ARCH.deb: a release build with the Swift runtime linked in statically (its own build folder).
deb: deps
	scripts/install-deps.sh libcurl4-openssl-dev
	$(SWIFT) build -c release --static-swift-stdlib --product kmsfs --build-path .build-deb
	scripts/deb.sh .build-deb/release/kmsfs .

## Builds everything and runs the whole test suite (mounts real FUSE filesystems).
test: deps
	$(SWIFT) build --build-tests
	scripts/man.sh --check
	$(SWIFT) test

## Builds and shows the main job end to end on a scratch filesystem.
demo: deps
	$(SWIFT) build --product kmsfs
	scripts/demo.sh

## A key held in AWS KMS (moto on 127.0.0.1), end to end: create, mount, write, disable it in KMS, see EKEYREVOKED.
demo-kms: deps
	$(SWIFT) build --product kmsfs
	scripts/demo-kms.sh

## What a key held in AWS KMS costs (moto on 127.0.0.1): creates/s and untar against a local key, KMS calls per 10,000 files (needs root).
bench-kms: deps
	scripts/install-deps.sh bc linux-source-6.1
	$(SWIFT) build -c release --product kmsfs
	bench/kms-bench.sh

## Regenerates man/ from the command definitions.
man: deps
	$(SWIFT) build --product kmsfs
	scripts/man.sh

## Growth: create/stat/unlink per file at 1k-100k files (SIZES=), flat and deep, memory per cached inode and open file, a 20 GiB file GiB by GiB (needs root).
bench-scale: deps
	scripts/install-deps.sh bc
	$(SWIFT) build -c release --product kmsfs
	bench/scale-bench.sh

## Seals and opens 256 MiB at 4–256 KiB chunks against `openssl speed` (release build).
bench-cipher: deps
	$(SWIFT) build -c release --product kmsfs-bench
	.build/release/kmsfs-bench cipher

## Filesystem workloads on kmsfs, gocryptfs and a plaintext FUSE passthrough (needs root).
bench: deps
	scripts/install-deps.sh gocryptfs bc linux-source-6.1
	$(SWIFT) build -c release --product kmsfs
	bench/fs-bench.sh

## Envelope unwraps per second and the scrypt unlock time (release build).
bench-keys: deps
	$(SWIFT) build -c release --product kmsfs-bench
	.build/release/kmsfs-bench keymanager

## Live rekey speed: rewrap files/s and reencrypt MB/s, idle and beside a streaming writer (needs root).
bench-rekey: deps
	scripts/install-deps.sh bc
	$(SWIFT) build -c release --product kmsfs
	bench/rekey-bench.sh

## What auditing costs: records/s, and untar with file creates audited and not (needs root).
bench-audit: deps
	scripts/install-deps.sh bc linux-source-6.1
	$(SWIFT) build -c release --product kmsfs
	$(SWIFT) build -c release --product kmsfs-bench
	bench/audit-bench.sh

clean:
	rm -rf .build
