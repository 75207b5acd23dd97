#!/usr/bin/env bash
# Boot-disk benchmark on the real Ceph cluster: time from request to a ready `vms/<instance>_disk`, in one run.
#   - clone path:  a raw image in Glance's Ceph store, cloned from Glance's own snapshot (POST /v1/disks)
#   - base path, first instance: a zlib qcow2 in Glance's file store; the agent downloads and verifies it,
#     inspects it and streams the conversion into a new shared base (cache and base emptied before each run)
#   - base path, second instance: the base exists; only a clone
#   - Nova's non-clone path on the same qcow2: download to a file, `qemu-img convert -O raw`, `rbd import`;
#     and the same as nova-compute runs it (download fsynced, `qemu-img convert -t none`)
# Medians (and p50 for the clone paths) of N runs (default 5) after one uncounted warm-up round. Needs scripts/ceph-cluster.sh and the Glance
# fixture started with IMGCONV_CEPH_ENV (both started here if not running).
# Usage: bench/disks.sh [runs] [qcow2 image (default: the 1 GiB mixed zlib qcow2 of bench/make-corpus.sh)]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
src=${2:-$dir/mixed-zlib.qcow2}
. bench/fixtures.sh
bench_fixtures GLANCE_RBD_STORE

work=$dir/disks
rm -rf "$work"; mkdir -p "$work"
qid=$(bench_upload "$src" qcow2 "" bench-disks)
head -c $((64 << 20)) "$dir/mixed.raw" >"$work/small.raw"
rid=$(bench_upload "$work/small.raw" raw "$GLANCE_RBD_STORE" bench-disks)

bench_agent_conf "$work" 8G
"$IMGCONV" agent --config "$work/agent.conf" --log-level warning 2>"$work/agent.log" &
agent=$!
cleanup() {
    kill $agent 2>/dev/null; wait $agent 2>/dev/null
    bench_remove_disks
    curl -s -X DELETE -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$qid" >/dev/null
    curl -s -X DELETE -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$rid" >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done
api() { curl -sf -m 3600 --unix-socket "$work/agent.sock" "$@"; }
create() {  # image -> "wall seconds" "disk name" "method"
    local inst t0 out
    inst=$(cat /proc/sys/kernel/random/uuid)
    t0=$(date +%s.%N)
    out=$(api -X POST -H 'Content-Type: application/json' -d "{\"instance_uuid\":\"$inst\",\"image_id\":\"$1\"}" http://a/v1/disks)
    echo "$(echo "$(date +%s.%N) - $t0" | bc) ${inst}_disk $(echo "$out" | python3 -c 'import json,sys;print(json.load(sys.stdin)["method"])')"
}
# Before each first-instance measurement: dirty pages written and the OSD done with the previous run's deletes
# (BlueStore frees a removed image's extents in the background), so no run pays for the one before it.
settle() { sync; sleep 2; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

clone=() first=() second=() nova=() nova2=() novad=()
record() { local -n into=$1; [ "$i" -gt 0 ] && into+=("$2"); return 0; }
# Round 0 warms both sides up and is not counted: the agent's first request issues a Keystone token, and on this
# VM the first runs of Nova's path touch cold memory (page cache costs several times more on pages the balloon
# driver reported free).
for i in $(seq 0 "$runs"); do
    # Nova: download, convert to raw, import (what nova-compute does for a qcow2 image with images_type = rbd).
    settle
    t0=$(date +%s.%N)
    curl -sf -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$qid/file" -o "$work/nova.part"
    qemu-img convert -f qcow2 -O raw "$work/nova.part" "$work/nova.raw"
    "${RBD[@]}" import --no-progress --image-format 2 "$work/nova.raw" "vms/bench-nova-$i" >/dev/null
    record nova "$(echo "$(date +%s.%N) - $t0" | bc)"
    # Nova, second instance of the same image: _base is cached, but every instance is a full rbd import.
    t0=$(date +%s.%N)
    "${RBD[@]}" import --no-progress --image-format 2 "$work/nova.raw" "vms/bench-nova-$i-2" >/dev/null
    record nova2 "$(echo "$(date +%s.%N) - $t0" | bc)"
    rm -f "$work/nova.part" "$work/nova.raw"
    "${RBD[@]}" rm --no-progress "vms/bench-nova-$i" >/dev/null
    "${RBD[@]}" rm --no-progress "vms/bench-nova-$i-2" >/dev/null
    # Nova as nova-compute runs it: the download is fsynced (nova/image/glance.py, _verify_and_write) and the
    # conversion uses `-t none` where the instances path takes O_DIRECT (nova/privsep/qemu.py,
    # unprivileged_convert_image), so rbd import reads the raw back from disk.
    settle
    t0=$(date +%s.%N)
    curl -sf -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$qid/file" -o "$work/nova.part"
    sync "$work/nova.part"
    qemu-img convert -t none -f qcow2 -O raw "$work/nova.part" "$work/nova.raw"
    "${RBD[@]}" import --no-progress --image-format 2 "$work/nova.raw" "vms/bench-nova-$i" >/dev/null
    record novad "$(echo "$(date +%s.%N) - $t0" | bc)"
    rm -f "$work/nova.part" "$work/nova.raw"
    "${RBD[@]}" rm --no-progress "vms/bench-nova-$i" >/dev/null

    # imgconv, first instance: nothing cached, no base.
    api -X DELETE "http://a/v1/images/$qid" >/dev/null 2>&1 || true
    settle
    read -r t name method < <(create "$qid")
    [ "$method" = base-built ] || { echo "expected base-built, got $method" >&2; exit 1; }
    record first "$t"
    read -r t name2 method < <(create "$qid")
    [ "$method" = base-reused ] || { echo "expected base-reused, got $method" >&2; exit 1; }
    record second "$t"
    for n in "$name" "$name2"; do api -X DELETE "http://a/v1/disks/$n" >/dev/null; done
    api -X POST "http://a/v1/bases/gc?idle=0" >/dev/null
done
# The clone path: 20 instances of a raw image Glance keeps in Ceph.
for i in $(seq 20); do
    read -r t name3 method < <(create "$rid")
    [ "$method" = glance-clone ] || { echo "expected glance-clone, got $method" >&2; exit 1; }
    clone+=("$t")
    api -X DELETE "http://a/v1/disks/$name3" >/dev/null
done
rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$agent/status")
m() { printf '%s\n' "$@" | median; }
nv=$(m "${nova[@]}") nvd=$(m "${novad[@]}") nv2=$(m "${nova2[@]}") fi=$(m "${first[@]}") se=$(m "${second[@]}") cl=$(m "${clone[@]}")
echo "source: $(basename "$src") ($(du -h --apparent-size "$src" | cut -f1), virtual $(qemu-img info --output json "$src" | python3 -c 'import json,sys;print(json.load(sys.stdin)["virtual-size"] >> 20)') MiB); medians of $runs; agent peak RSS ${rss} MiB"
echo "| instance | Nova (s) | imgconv (s) | Nova / imgconv |"
echo "|---|---|---|---|"
printf '| first: Nova downloads, qemu-img convert -O raw, rbd import; imgconv downloads, verifies, converts into a base, snapshots, clones | %s | %s | %.2fx |\n' "$nv" "$fi" "$(echo "$nv / $fi" | bc -l)"
printf '| first, Nova as nova-compute runs it: the download fsynced, qemu-img convert -t none (O_DIRECT), rbd import | %s | %s | %.2fx |\n' "$nvd" "$fi" "$(echo "$nvd / $fi" | bc -l)"
printf '| second: Nova rbd import of its cached raw; imgconv clones the base | %s | %s | %.0fx |\n' "$nv2" "$se" "$(echo "$nv2 / $se" | bc -l)"
p90=$(printf '%s\n' "${clone[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int(NR * 0.9)]}')
printf '| raw image in Glance'"'"'s Ceph store: imgconv clones Glance'"'"'s snapshot (64 MiB image; p50, p90 of 20) | | %s, %s | |\n' "$cl" "$p90"
ratios=$(for k in "${!nova[@]}"; do echo "${nova[$k]} / ${first[$k]}" | bc -l; done | sort -n | awk '{printf "%.2f ", $1}')
echo "Nova / imgconv (first instance) run by run, sorted: $ratios"
echo "all runs: nova ${nova[*]}; nova as run by nova-compute ${novad[*]}; nova second ${nova2[*]}; first ${first[*]}; second ${second[*]}; clone ${clone[*]}"
