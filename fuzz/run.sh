#!/usr/bin/env bash
# Builds the libFuzzer + AddressSanitizer harnesses and runs each of them.
#   fuzz/run.sh                 one million executions per harness (the issue's bar)
#   fuzz/run.sh -runs=20000     a smoke run (CI)
#   fuzz/run.sh -max_total_time=60
# Seeds: fuzz/seeds/ (fuzz/make-seeds.sh) plus fuzz/regressions/. Crashes land in fuzz/artifacts/<harness>/; fix them and copy the
# input to fuzz/regressions/, where the unit tests replay it on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("${@:--runs=1000000}")
# Release with ASan: about 7x the executions per second of a debug build (vmdk: 1,200/s against 170/s).
config=${FUZZ_CONFIG:-release}
export IMGCONV_FUZZ=1 SWIFT_BACKTRACE=enable=no
harnesses=(FuzzQCOW2 FuzzVMDK FuzzVPC FuzzVDI FuzzDetect)
for h in "${harnesses[@]}"; do
    swift build --scratch-path .build-fuzz -c "$config" --product "$h" \
        --sanitize=fuzzer -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=address \
        -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld 2>&1 | grep -E "error|warning: unre" || true
done
bin=$(IMGCONV_FUZZ=1 swift build --scratch-path .build-fuzz -c "$config" --show-bin-path)
status=0
for h in "${harnesses[@]}"; do
    corpus=.build-fuzz/corpus/$h
    mkdir -p "$corpus" "fuzz/artifacts/$h"
    cp -n fuzz/seeds/* fuzz/regressions/* "$corpus"/ 2>/dev/null || true
    echo "== $h ${args[*]}"
    # -rss_limit_mb: ASan's quarantine costs ~500 MB; anything beyond 2 GB is an unbounded allocation.
    if ! "$bin/$h" "${args[@]}" -rss_limit_mb=2048 -timeout=10 -max_len=262144 \
            -artifact_prefix="fuzz/artifacts/$h/" "$corpus" 2>&1 | tee ".build-fuzz/$h.log" | grep -E "^#[0-9]+ *(DONE|INITED)|ERROR|Done [0-9]+ runs|crash|leak|timeout" ; then
        :
    fi
    if grep -qE "ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|SUMMARY: " ".build-fuzz/$h.log"; then
        echo "!! $h found a problem: see .build-fuzz/$h.log and fuzz/artifacts/$h/"
        status=1
    fi
done
exit $status
