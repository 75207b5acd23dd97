#!/usr/bin/env bash
# Runs the test suites that use librados in this process (the RBD binding, the disk service, the agent disk
# tests) N times in a row (default 20) and counts the runs that crashed: a test process killed by a signal, or
# one that reports librados clients still open at exit (which imgconv then ends with _exit instead of crashing in
# librados' destructors; see scripts/librados-exit.sh). Starts and stops the services like scripts/test.sh.
#   bash scripts/ceph-soak.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
export IMGCONV_REQUIRE_OPENSTACK=1 IMGCONV_REQUIRE_CEPH=1 IMGCONV_REQUIRE_QEMU=1
. scripts/services.sh
services_start
swift build --build-tests || exit 1
services_wait
suites='RBDTests|RBDDiskTests|AgentDiskTests'
crashed=0 failed=0 leaked=0
log=$(mktemp)
for i in $(seq 1 "$runs"); do
    start=$SECONDS
    swift test --skip-build --filter "$suites" >"$log" 2>&1
    rc=$?
    verdict=ok
    if grep -q "still open at exit" "$log"; then leaked=$((leaked + 1)); verdict="clients left open"; fi
    if [ "$rc" -ge 128 ] || grep -qE "Fatal error|Segmentation fault|Aborted|crashed:" "$log"; then
        crashed=$((crashed + 1)); verdict="CRASHED (exit $rc)"
        cp "$log" "/tmp/imgconv-soak-crash-$i.log"
    elif [ "$rc" -ne 0 ]; then
        failed=$((failed + 1)); verdict="tests failed (exit $rc)"
        cp "$log" "/tmp/imgconv-soak-failed-$i.log"
    fi
    echo "run $i/$runs: $verdict in $((SECONDS - start)) s ($(grep -oE 'Test run with [0-9]+ tests' "$log" | tail -1))"
done
rm -f "$log"
echo "ceph soak: $runs runs, $crashed crashed, $leaked left librados clients open at exit, $failed had failing tests"
[ "$crashed" -eq 0 ] && [ "$leaked" -eq 0 ]
