#!/usr/bin/env bash
# Prefetch at scale: N images (default 50, SIZE_MIB each, distinct bytes, tagged) prefetched by one agent with
# [prefetch] concurrency = 4, against the peer fetching the same images with the same concurrency:
# `curl | tee FILE | sha512sum`, 4 at a time (xargs -P 4), then compares each digest with Glance's
# os_hash_value as the agent does. Each round is interleaved (peer, then agent, on a fresh cache); medians of
# ROUNDS. Then one agent run with `bandwidth_limit = LIMIT` shared by the 4 prefetches: the aggregate rate must
# stay at or below LIMIT. Peak RSS of the agent (bench/rss_breakdown.py) for every run.
# Needs the Ceph and Glance fixtures (started here if not running).
# Usage: bench/prefetch.sh [rounds]   env: N=50 SIZE_MIB=24 LIMIT=128M
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
n=${N:-50}
size_mib=${SIZE_MIB:-24}
limit=${LIMIT:-128M}
. bench/fixtures.sh
bench_fixtures GLANCE_RBD_STORE
work=/tmp/imgconv-bench/prefetch
rm -rf "$work"; mkdir -p "$work/images"
tag=bench-prefetch-$$
ids=()
agent=
cleanup() {
    [ -n "$agent" ] && { kill "$agent" 2>/dev/null; wait "$agent" 2>/dev/null || true; }
    for id in "${ids[@]}"; do curl -s -X DELETE -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id" >/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

# N images of SIZE_MIB: random data with a quarter of zeros (so each is distinct and compresses like a disk).
python3 - "$work/images" "$n" "$size_mib" <<'PY'
import os, sys
d, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(3 << 20)
for k in range(n):
    with open(os.path.join(d, '%02d.raw' % k), 'wb') as f:
        f.write(k.to_bytes(8, 'little') + os.urandom(4088))
        left = (mib << 20) - 4096
        while left > 0:
            f.write(block[:min(left, 3 << 20)]); left -= 3 << 20
            if left > 0:
                z = min(left, 1 << 20); f.write(bytes(z)); left -= z
PY
for f in "$work"/images/*.raw; do
    id=$(bench_upload "$f" raw "" "$tag")
    curl -sf -X PUT -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id/tags/$tag" >/dev/null
    ids+=("$id")
done
rm -rf "$work/images"
total=$((n * size_mib * 1048576))
echo "$n images of $size_mib MiB ($((total >> 20)) MiB), tag $tag"

now() { date +%s.%N; }

# The peer: 4 at a time, each `curl | tee file | sha512sum`, then the digest against Glance's os_hash_value.
peer_one() {
    local id=$1 dir=$2 got want
    got=$(curl -sf -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id/file" | tee "$dir/$id" | sha512sum | cut -d' ' -f1)
    want=$(curl -sf -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$id" |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["os_hash_value"])')
    [ "$got" = "$want" ] || { echo "peer: $id digest mismatch" >&2; exit 1; }
}
export -f peer_one
export GLANCE_URL TOK

# One agent run: prefetch everything with the tag; prints "seconds peak_mib".
agent_run() {
    local d=$work/agent t0 t1 ready
    rm -rf "$d"; mkdir -p "$d"
    bench_agent_conf "$d" 64G
    printf '[prefetch]\ntag = %s\nconcurrency = 4\ninterval = 1h\n%s' "$tag" "${1:+bandwidth_limit = $1
}" >>"$d/agent.conf"
    t0=$(now)
    "$IMGCONV" agent --config "$d/agent.conf" --log-level warning 2>"$d/agent.log" &
    agent=$!
    python3 bench/rss_breakdown.py "$agent" --watch 0.2 >"$d/peak" &
    local watcher=$!
    for _ in $(seq 6000); do
        ready=$(curl -sf --unix-socket "$d/agent.sock" http://a/v1/images 2>/dev/null |
            python3 -c 'import json,sys;print(sum(i["state"]=="ready" for i in json.load(sys.stdin)["images"]))' 2>/dev/null || echo 0)
        [ "$ready" -ge "$n" ] && break
        sleep 0.1
    done
    t1=$(now)
    kill -TERM $watcher; wait $watcher || true
    kill "$agent"; wait "$agent" 2>/dev/null || true
    agent=
    [ "$ready" -ge "$n" ] || { echo "agent: only $ready of $n ready" >&2; tail -20 "$d/agent.log" >&2; exit 1; }
    if grep -qi ' error ' "$d/agent.log"; then echo "agent logged errors:" >&2; grep -i ' error ' "$d/agent.log" | head >&2; exit 1; fi
    echo "$(python3 -c "print('%.2f' % ($t1 - $t0))") $(head -1 "$d/peak" | sed -E 's/.*: ([0-9.]+) MiB resident.*/\1/')"
}

peer_times=(); agent_times=(); peaks=()
for r in $(seq "$rounds"); do
    mkdir -p "$work/peer"
    t0=$(now)
    printf '%s\n' "${ids[@]}" | xargs -P 4 -I{} bash -c 'peer_one {} '"$work/peer"
    peer_times+=("$(python3 -c "print('%.2f' % ($(now) - $t0))")")
    rm -rf "$work/peer"
    read -r secs peak < <(agent_run "")
    agent_times+=("$secs"); peaks+=("$peak")
    echo "round $r: peer ${peer_times[-1]} s, imgconv $secs s (peak RSS $peak MiB)"
done
read -r lsecs lpeak < <(agent_run "$limit")
python3 - "$total" "$limit" "$lsecs" "$lpeak" "${peer_times[*]}" "${agent_times[*]}" "${peaks[*]}" <<'PY'
import statistics, sys
total, limit, lsecs, lpeak = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
peer = [float(x) for x in sys.argv[5].split()]
agent = [float(x) for x in sys.argv[6].split()]
peaks = [float(x) for x in sys.argv[7].split()]
mib = total / 1048576.0
units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
lim = float(limit[:-1]) * units[limit[-1].upper()] if limit[-1].upper() in units else float(limit)
med = statistics.median
print('peer (curl | tee | sha512sum, 4 at a time): median %.2f s (%.2f-%.2f), %.0f MiB/s'
      % (med(peer), min(peer), max(peer), mib / med(peer)))
print('imgconv prefetch (concurrency 4):           median %.2f s (%.2f-%.2f), %.0f MiB/s, peak RSS %.0f-%.0f MiB'
      % (med(agent), min(agent), max(agent), mib / med(agent), min(peaks), max(peaks)))
print('ratio (peer / imgconv): %.2fx' % (med(peer) / med(agent)))
rate = total / lsecs
print('with bandwidth_limit = %s shared: %.2f s, %.1f MiB/s (limit %.1f MiB/s), peak RSS %s MiB'
      % (limit, lsecs, rate / 1048576.0, lim / 1048576.0, lpeak))
if rate > lim * 1.05:
    sys.exit('the prefetches together ran above the shared limit')
PY
