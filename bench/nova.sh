#!/usr/bin/env bash
# Root disks through Nova 34.0.0's own code (LibvirtDriver._create_and_inject_local_root), images_type = rbd
# (Nova downloads, converts with qemu-img, rbd import) against images_type = imgconv (the agent makes the disk),
# on the real fixtures, with the release build of the agent. The image is a qcow2 of SIZE MiB (default 512) of
# bench/make-corpus.sh's mixed data; every path and run gets a fresh upload; medians of RUNS (default 5) after
# a warm-up round, the order alternating.
# Usage: bench/nova.sh [runs] [size MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
mib=${2:-512}
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
. bench/fixtures.sh
bench_fixtures GLANCE_PRIVATE_URL
# The Nova venv with the patch and the client (scripts/nova-tests.sh makes it; its patch test is quick).
bash scripts/nova-tests.sh test_imgconv_backend.PatchTest >/dev/null 2>&1
work=$dir/nova
rm -rf "$work"; mkdir -p "$work"
trap 'rm -rf "$work"; bench_remove_disks' EXIT
head -c $((mib << 20)) "$dir/mixed.raw" >"$work/image.raw"
qemu-img convert -f raw -O qcow2 "$work/image.raw" "$work/image.qcow2"
rm -f "$work/image.raw"
IMGCONV_BINARY=$IMGCONV "${IMGCONV_FIXTURE_DIR:-/tmp/imgconv-openstack}/venv-nova/bin/python" bench/nova_boot.py \
    "$runs" "$work/image.qcow2" 2> >(grep -v -i -E 'eventlet|warnings.warn|deprecat|^$|framework|migration|If you' >&2)
