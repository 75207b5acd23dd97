#!/usr/bin/env bash
# Fleet benchmark: N agent processes, one per simulated compute node (each with its own state, cache and socket),
# on one Ceph cluster and one Glance, all asked at the same moment for a disk of the same qcow2 image that no node
# has. Measures per-node time to a ready disk (p50, p90, max), checks that exactly one base was imported and that
# Glance served the image once, counts the bytes Glance sent and the OSD operations the fleet caused; then a
# second image while the first one's base is collected. The single-node first instance (one agent, the same
# image under a new id) is measured in the same run, before the fleet, as the reference for "within 1.5x".
# Usage: bench/fleet.sh [N (32)] [rounds (3)] [qcow2 image (default: the 1 GiB mixed zlib qcow2 of make-corpus)]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-32}
rounds=${2:-3}
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
src=${3:-$dir/mixed-zlib.qcow2}
. bench/fixtures.sh
bench_fixtures GLANCE_RBD_STORE
CEPH=(ceph -c "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING")

work=$dir/fleet
rm -rf "$work"; mkdir -p "$work"
images=()
pids=()
start_agent() {  # index
    local d=$work/node-$1
    mkdir -p "$d"
    bench_agent_conf "$d" 4G
    "$IMGCONV" agent --config "$d/agent.conf" --log-level "${LOG_LEVEL:-info}" 2>"$d/agent.log" &
    pids[$1]=$!
}
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    bench_remove_disks
    for id in "${images[@]}"; do curl -s -X DELETE -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id" >/dev/null; done
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
api() {  # node curl-args...
    local node=$1; shift
    curl -sf -m 3600 --unix-socket "$work/node-$node/agent.sock" "$@"
}
# fire TAG IMAGE NODE...: asks the nodes at the same moment (bench/fire.py: one client process, connections
# opened beforehand) and writes "seconds method name" to $work/TAG.I for each node I.
fire() {
    local tag=$1 image=$2 i socks=()
    shift 2
    for i in "$@"; do socks+=("$work/node-$i/agent.sock"); done
    python3 bench/fire.py "$image" "$work/$tag" "${socks[@]}"
}
# fleet IMAGE TAG: every node at once; per-node results in $work/TAG.*
fleet() { fire "$2" "$1" $(seq 0 $((n - 1))); }
remove_disks() {  # TAG
    local i name
    for i in $(seq 0 $((n - 1))); do
        name=$(awk '{print $3}' "$work/$1.$i")
        [ -n "$name" ] && [ "$name" != None ] && api "$i" -X DELETE "http://a/v1/disks/$name" >/dev/null 2>&1 || true
    done
}
pct() {  # p (0-100) < values
    sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100+0.999); if (i<1) i=1; print a[i]}'
}
glance_file_gets() { grep -c "GET /v2/images/$1/file" "$GLANCE_ACCESS_LOG" || true; }
glance_file_bytes() { grep "GET /v2/images/$1/file" "$GLANCE_ACCESS_LOG" | awk '{s += ($10 == "-" ? 0 : $10)} END {print s + 0}'; }
# CPU seconds (user + system) so far of the processes whose command line matches each pattern, "name=seconds ...".
cpu_seconds() {
    local pat t p tick
    tick=$(getconf CLK_TCK)
    for pat in keystone glance ceph-osd ceph-mon imgconv-agent; do
        t=0
        for p in $(pgrep -f "$pat"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
        printf '%s=%s ' "$pat" "$(echo "scale=2; $t / $tick" | bc)"
    done
}
# cpu_delta BEFORE AFTER: the difference per name.
cpu_delta() {
    python3 -c 'import sys; a = dict(x.split("=") for x in sys.argv[1].split()); b = dict(x.split("=") for x in sys.argv[2].split()); print(", ".join("%s %.2f" % (k, float(b[k]) - float(a.get(k, 0))) for k in b))' "$1" "$2"
}
osd_ops() { "${CEPH[@]}" tell osd.0 perf dump osd 2>/dev/null | python3 -c 'import json,sys;d=json.load(sys.stdin)["osd"];print(d["op"], d["op_r"], d["op_w"])'; }

echo "starting $n agents" >&2
for i in $(seq 0 $((n - 1))); do start_agent "$i"; done
for i in $(seq 0 $((n - 1))); do
    for _ in $(seq 300); do [ -S "$work/node-$i/agent.sock" ] && break; sleep 0.1; done
done
# Warm-up, not counted: every node gets its Keystone token and its Ceph client with a disk of a small raw image in
# Glance's Ceph store (a glance-clone), as long-running agents have.
head -c $((16 << 20)) "$dir/mixed.raw" >"$work/small.raw"
warm=$(bench_upload "$work/small.raw" raw "$GLANCE_RBD_STORE" bench-fleet); images+=("$warm")
fleet "$warm" warm
remove_disks warm
size=$(stat -c %s "$src")

single=() p50s=() p90s=() maxs=() ratios=()
for r in $(seq 1 "$rounds"); do
    # The reference: one node alone, first instance of a fresh upload (nothing cached, no base).
    ref=$(bench_upload "$src" qcow2 "" bench-fleet); images+=("$ref")
    sync; sleep 2
    scpu0=$(cpu_seconds)
    fire single "$ref" 0
    scpu1=$(cpu_seconds)
    read -r t m _ <"$work/single.0"
    [ "$m" = base-built ] || { echo "single: expected base-built, got $m" >&2; exit 1; }
    single+=("$t")
    api 0 -X DELETE "http://a/v1/disks/$(awk '{print $3}' "$work/single.0")" >/dev/null
    api 0 -X POST "http://a/v1/bases/gc?idle=0&image=$ref" >/dev/null
    api 0 -X DELETE "http://a/v1/images/$ref" >/dev/null 2>&1 || true

    # The fleet: every node at once, on a fresh upload of the same bytes.
    img=$(bench_upload "$src" qcow2 "" bench-fleet); images+=("$img")
    sync; sleep 2
    ops0=$(osd_ops) cpu0=$(cpu_seconds)
    fleet "$img" "r$r"
    ops1=$(osd_ops) cpu1=$(cpu_seconds)
    times=$(cat "$work/r$r".* | awk '{print $1}')
    methods=$(cat "$work/r$r".* | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')
    built=$(cat "$work/r$r".* | awk '$2 == "base-built"' | wc -l)
    gets=$(glance_file_gets "$img")
    bytes=$(glance_file_bytes "$img")
    p50=$(echo "$times" | pct 50) p90=$(echo "$times" | pct 90) max=$(echo "$times" | pct 100)
    p50s+=("$p50"); p90s+=("$p90"); maxs+=("$max")
    ratios+=("$(echo "$max / $t" | bc -l)")
    read -r o0 r0 w0 <<<"$ops0"; read -r o1 r1 w1 <<<"$ops1"
    echo "round $r: single first instance $t s; fleet of $n: p50 $p50 s, p90 $p90 s, max $max s (max / single $(printf %.2f "$(echo "$max / $t" | bc -l)")x); methods: $methods; bases built: $built; Glance file GETs: $gets, bytes $bytes (image $size); OSD ops $((o1 - o0)) (reads $((r1 - r0)), writes $((w1 - w0)))"
    echo "  builder $(cat "$work/r$r".* | awk '$2 == "base-built" {print $1}') s; every node, sorted: $(echo "$times" | sort -n | awk '{printf "%.2f ", $1}')"
    echo "  CPU seconds, single: $(cpu_delta "$scpu0" "$scpu1"); fleet: $(cpu_delta "$cpu0" "$cpu1")"
    [ "$built" -eq 1 ] || echo "FAIL: $built bases built" >&2
    [ "$gets" -eq 1 ] || echo "FAIL: Glance served the image $gets times" >&2

    # The second image while the first one's base is collected.
    remove_disks "r$r"
    img2=$(bench_upload "$src" qcow2 "" bench-fleet); images+=("$img2")
    sync; sleep 1
    api 0 -X POST "http://a/v1/bases/gc?idle=0&image=$img" >"$work/gc.out" &
    gcpid=$!
    fleet "$img2" "s$r"
    wait $gcpid || true
    times2=$(cat "$work/s$r".* | awk '{print $1}')
    built2=$(cat "$work/s$r".* | awk '$2 == "base-built"' | wc -l)
    echo "round $r, second image during GC: p50 $(echo "$times2" | pct 50) s, p90 $(echo "$times2" | pct 90) s, max $(echo "$times2" | pct 100) s; bases built: $built2; Glance file GETs: $(glance_file_gets "$img2"); GC: $(cat "$work/gc.out")"
    remove_disks "s$r"
    api 0 -X POST "http://a/v1/bases/gc?idle=0&image=$img2" >/dev/null
    for i in $(seq 0 $((n - 1))); do
        api "$i" -X DELETE "http://a/v1/images/$img" >/dev/null 2>&1 || true
        api "$i" -X DELETE "http://a/v1/images/$img2" >/dev/null 2>&1 || true
    done
done

errors=$(cat "$work"/node-*/agent.log | grep -cE '\+0000 (error|critical) ' || true)
rss=$(for p in "${pids[@]}"; do awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$p/status"; done | sort -n)
med() { printf '%s\n' "$@" | pct 50; }
echo
echo "| $n nodes, $(basename "$src") ($((size >> 20)) MiB), medians of $rounds rounds | s |"
echo "|---|---|"
echo "| single node, first instance | $(med "${single[@]}") |"
echo "| fleet p50 | $(med "${p50s[@]}") |"
echo "| fleet p90 | $(med "${p90s[@]}") |"
echo "| fleet max | $(med "${maxs[@]}") |"
echo "| fleet max / single (target <= 1.5x) | $(printf %.2f "$(med "${ratios[@]}")")x |"
echo
echo "agent errors logged: $errors; agent peak RSS MiB: min $(echo "$rss" | head -1), median $(echo "$rss" | pct 50), max $(echo "$rss" | tail -1)"
echo "all rounds: single ${single[*]}; p50 ${p50s[*]}; p90 ${p90s[*]}; max ${maxs[*]}"
[ "$errors" -eq 0 ] || { grep -hE '\+0000 (error|critical) ' "$work"/node-*/agent.log | head -5 >&2; exit 1; }
