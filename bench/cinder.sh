#!/usr/bin/env bash
# First instance from an image in a Glance cinder store (the Cinder fixture: volumes are RBD images of the test
# cluster), three ways, in one run, rounds interleaved, medians:
#   - cinder-clone: the agent copies the base from the image's volume inside the cluster (hashed, inspected,
#     converted through librbd), then clones it;
#   - download: the same agent with `[cinder] enabled = false`: Glance attaches the volume (os-brick, librbd) and
#     streams it; the agent verifies and converts into the base, then clones it;
#   - Nova: download to a file through Glance, `qemu-img convert -O raw` for a qcow2, `rbd import`.
# For the 1 GiB raw of make-corpus in cinder-fast and the 1 GiB zlib qcow2 (273 MiB) in cinder-slow.
# Usage: bench/cinder.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
. bench/fixtures.sh
bench_fixtures GLANCE_CINDER_STORES
work=$dir/cinder
rm -rf "$work"; mkdir -p "$work"
rid=$(bench_upload "$dir/mixed.raw" raw cinder-fast bench-cinder)
qid=$(bench_upload "$dir/mixed-zlib.qcow2" qcow2 cinder-slow bench-cinder)
agents=()
cleanup() {
    for a in "${agents[@]}"; do kill "$a" 2>/dev/null; wait "$a" 2>/dev/null || true; done
    bench_remove_disks
    for id in "$rid" "$qid"; do curl -s -X DELETE -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id" >/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
for side in cinder download; do
    mkdir -p "$work/$side"
    bench_agent_conf "$work/$side" 8G
    [ "$side" = download ] && printf '[cinder]\nenabled = false\n' >>"$work/$side/agent.conf"
    "$IMGCONV" agent --config "$work/$side/agent.conf" --log-level warning 2>"$work/$side/agent.log" &
    agents+=($!)
    for _ in $(seq 100); do [ -S "$work/$side/agent.sock" ] && break; sleep 0.1; done
done
settle() { sync; sleep 2; }
now() { date +%s.%N; }
create() {  # side image -> "seconds method"; removes the disk and the base afterwards
    local inst t0 out secs method
    inst=$(cat /proc/sys/kernel/random/uuid)
    t0=$(now)
    out=$(curl -sf -m 3600 --unix-socket "$work/$1/agent.sock" -X POST -H 'Content-Type: application/json' \
        -d "{\"instance_uuid\":\"$inst\",\"image_id\":\"$2\"}" http://a/v1/disks)
    secs=$(echo "$(now) - $t0" | bc)
    method=$(echo "$out" | python3 -c 'import json,sys;print(json.load(sys.stdin)["method"])')
    curl -sf --unix-socket "$work/$1/agent.sock" -X DELETE "http://a/v1/disks/${inst}_disk" >/dev/null
    curl -sf --unix-socket "$work/$1/agent.sock" -X POST "http://a/v1/bases/gc?idle=0" >/dev/null
    curl -s --unix-socket "$work/$1/agent.sock" -X DELETE "http://a/v1/images/$2" >/dev/null || true
    echo "$secs $method"
}
nova() {  # image format -> seconds
    local t0
    t0=$(now)
    curl -sf -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$1/file" -o "$work/nova.part"
    if [ "$2" = qcow2 ]; then qemu-img convert -f qcow2 -O raw "$work/nova.part" "$work/nova.raw"; else mv "$work/nova.part" "$work/nova.raw"; fi
    "${RBD[@]}" import --no-progress --image-format 2 "$work/nova.raw" vms/bench-nova-cinder >/dev/null
    echo "$(now) - $t0" | bc
    rm -f "$work/nova.part" "$work/nova.raw"
    "${RBD[@]}" rm --no-progress vms/bench-nova-cinder >/dev/null
}
declare -A times
for r in $(seq 0 "$rounds"); do   # round 0 warms up (tokens, Ceph clients, Glance's os-brick) and is not counted
    for img in raw qcow2; do
        id=$rid; [ $img = qcow2 ] && id=$qid
        want=cinder-clone; [ $img = qcow2 ] && want=cinder-convert
        settle; read -r t m < <(create cinder "$id")
        [ "$m" = "$want" ] || { echo "expected $want, got $m" >&2; tail -5 "$work/cinder/agent.log" >&2; exit 1; }
        if [ "$r" -gt 0 ]; then times[$img-cinder]+="$t "; fi
        settle; read -r t m < <(create download "$id")
        [ "$m" = base-built ] || { echo "expected base-built, got $m" >&2; exit 1; }
        if [ "$r" -gt 0 ]; then times[$img-download]+="$t "; fi
        settle; t=$(nova "$id" $img)
        if [ "$r" -gt 0 ]; then times[$img-nova]+="$t "; fi
    done
    if [ "$r" -gt 0 ]; then echo "round $r done" >&2; fi
done
python3 - "${times[raw-cinder]}" "${times[raw-download]}" "${times[raw-nova]}" \
    "${times[qcow2-cinder]}" "${times[qcow2-download]}" "${times[qcow2-nova]}" <<'PY'
import statistics, sys
v = [[float(x) for x in a.split()] for a in sys.argv[1:]]
med = statistics.median
print('| image | cinder-clone / cinder-convert | imgconv download path | Nova (download, convert, rbd import) | download / cinder | Nova / cinder |')
print('|---|---|---|---|---|---|')
for name, (c, d, n) in (('1 GiB raw in cinder-fast', v[0:3]), ('1 GiB zlib qcow2 (273 MiB) in cinder-slow', v[3:6])):
    print('| %s | %.2f s (%.2f-%.2f) | %.2f s (%.2f-%.2f) | %.2f s (%.2f-%.2f) | %.2fx | %.2fx |' % (
        name, med(c), min(c), max(c), med(d), min(d), max(d), med(n), min(n), max(n), med(d) / med(c), med(n) / med(c)))
PY
