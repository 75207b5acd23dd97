#!/usr/bin/env bash
# The test command: unit tests of every module, the CLI tests and the qemu-img oracle suite.
# IMGCONV_REQUIRE_QEMU=1 makes a missing qemu-img a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export IMGCONV_REQUIRE_QEMU=1
swift build --build-tests
swift test --skip-build
