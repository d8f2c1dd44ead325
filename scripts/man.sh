#!/usr/bin/env bash
# Regenerates the man pages in man/ from the command-line definitions
# (swift-argument-parser's generate-manual plugin). With --check, fails when
# the committed pages differ from what the code would generate.
set -euo pipefail
cd "$(dirname "$0")/.."
swift package plugin generate-manual --multi-page --date 2026-11-29 \
    --authors "the kmsfs developers" --configuration debug >/dev/null
generated=.build/plugins/GenerateManual/outputs/kmsfs
if [ "${1:-}" = "--check" ]; then
    if ! diff -r -q "$generated" man >/dev/null; then
        diff -r "$generated" man | head -40
        echo "man/ is out of date: run 'make man' and commit the result" >&2
        exit 1
    fi
    echo "man pages: up to date ($(ls man | wc -l) pages)"
else
    rm -rf man && mkdir man && cp "$generated"/*.1 man/
    echo "wrote $(ls man | wc -l) man pages to man/"
fi
