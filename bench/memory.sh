#!/usr/bin/env bash
# Agent memory, broken down (bench/rss_breakdown.py): idle after start, the peak of a first-instance build (a
# disk of the 1 GiB zlib qcow2 of make-corpus: download, verify, convert into a new base, clone), and idle again
# after the memory trim ([agent] memory_trim_idle = 5s here), then the time of a second instance (a clone of the
# base) right after the trim, when the code it runs must be paged in again. Needs the Ceph and Glance fixtures
# (started here if not running).
# Usage: bench/memory.sh [qcow2 image]   env: AGENT_BIN=another imgconv-agent binary (e.g. one linked with
# --static-swift-stdlib) to measure instead of the release build; TRIM_CODE=false to keep the code's pages
# ([agent] memory_trim_code)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
src=${1:-$dir/mixed-zlib.qcow2}
. bench/fixtures.sh
bench_fixtures GLANCE_RBD_STORE
work=$dir/memory
rm -rf "$work"; mkdir -p "$work"
id=$(bench_upload "$src" qcow2 "" bench-memory)
bench_agent_conf "$work" 8G "memory_trim_idle = 5s" "memory_trim_code = ${TRIM_CODE:-true}"
"${AGENT_BIN:-$IMGCONV}" agent --config "$work/agent.conf" --log-level warning 2>"$work/agent.log" &
agent=$!
cleanup() {
    kill $agent 2>/dev/null; wait $agent 2>/dev/null
    bench_remove_disks
    curl -s -X DELETE -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id" >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done
sleep 2
python3 bench/rss_breakdown.py $agent | sed 's/^pid [0-9]*/idle after start/'
python3 bench/rss_breakdown.py $agent --watch 0.1 >"$work/peak" &
watcher=$!
instance() {
    local inst t0
    inst=$(cat /proc/sys/kernel/random/uuid)
    t0=$(date +%s.%N)
    curl -sf -m 3600 --unix-socket "$work/agent.sock" -X POST -H 'Content-Type: application/json' \
        -d "{\"instance_uuid\":\"$inst\",\"image_id\":\"$id\"}" http://a/v1/disks >/dev/null
    python3 -c "print('%.3f s' % ($(date +%s.%N) - $t0))"
}
echo "first instance: $(instance)"
kill -TERM $watcher; wait $watcher || true
sed 's/^peak of pid [0-9]*/peak of a first-instance build/' "$work/peak"
echo "VmHWM (kernel's peak): $(awk '/VmHWM/ {print int($2 / 1024)}' /proc/$agent/status) MiB"
sleep 12
python3 bench/rss_breakdown.py $agent | sed 's/^pid [0-9]*/idle after the trim/'
python3 bench/rss_breakdown.py $agent --files
echo "second instance (a clone), right after the trim: $(instance)"
python3 bench/rss_breakdown.py $agent | head -1 | sed 's/^pid [0-9]*/after the second instance/'
