#!/usr/bin/env bash
# Download-and-verify benchmark: the agent fetching a 1 GiB image from the local Glance (stream, sha512 (os_hash_value),
# inspection, fsync, rename) against `curl -s URL | tee FILE | sha512sum` on the same image, in one run.
# Medians of N runs (default 5), alternating the two. Needs the Keystone/Glance fixture (started if not running).
# Usage: bench/download.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
envfile=$(bash scripts/openstack-fixture.sh env)
if ! [ -f "$envfile" ] || ! curl -sf -m 5 -o /dev/null "$(. "$envfile"; echo "$GLANCE_URL")/healthcheck"; then
    bash scripts/openstack-fixture.sh start >/dev/null
fi
# shellcheck disable=SC1090
. "$envfile"
swift build -c release --product imgconv >/dev/null && swift build -c release --product imgconv-agent >/dev/null
IMGCONV=$(swift build -c release --show-bin-path)/imgconv

TOK=$(bash scripts/openstack-fixture.sh token)
# The image: mixed.raw (1 GiB of text, binaries, random data and zeros), uploaded once per fixture.
idfile=$dir/glance-image-id
ID=$(cat "$idfile" 2>/dev/null || true)
if [ -z "$ID" ] || [ "$(curl -s -o /dev/null -w '%{http_code}' -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$ID")" != 200 ]; then
    ID=$(curl -sf -X POST "$GLANCE_URL/v2/images" -H "X-Auth-Token: $TOK" -H 'Content-Type: application/json' \
        -d '{"name":"bench-1g","disk_format":"raw","container_format":"bare"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
    curl -sf -X PUT "$GLANCE_URL/v2/images/$ID/file" -H "X-Auth-Token: $TOK" -H 'Content-Type: application/octet-stream' \
        -T "$dir/mixed.raw" >/dev/null
    echo "$ID" >"$idfile"
fi
want=$(curl -sf -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$ID" | python3 -c 'import json,sys;print(json.load(sys.stdin)["os_hash_value"])')

work=$dir/download
rm -rf "$work"; mkdir -p "$work"
cat >"$work/agent.conf" <<EOF
[agent]
socket_path = $work/agent.sock
state_dir = $work/state
[glance]
auth_url = $KEYSTONE_URL
username = admin
password = secret
project_name = admin
[cache]
directory = $work/cache
max_size = 4G
EOF
"$IMGCONV" agent --config "$work/agent.conf" --log-level warning 2>"$work/agent.log" &
agent=$!
trap 'kill $agent 2>/dev/null; wait $agent 2>/dev/null; rm -rf "$work/cache" "$work/peer.img"' EXIT
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done
export IMGCONV_SOCKET=$work/agent.sock

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks
hz=$(getconf CLK_TCK)
peer=() peer_sync=() ours=() ours_cpu=()
for i in $(seq "$runs"); do
    sync
    t0=$(now)
    got=$(curl -s -H "X-Auth-Token: $TOK" "$GLANCE_URL/v2/images/$ID/file" | tee "$work/peer.img" | sha512sum | cut -d' ' -f1)
    t1=$(now)
    sync "$work/peer.img"
    t2=$(now)
    [ "$got" = "$want" ] || { echo "peer hash mismatch" >&2; exit 1; }
    rm -f "$work/peer.img"
    peer+=("$(echo "$t1 - $t0" | bc)")
    peer_sync+=("$(echo "$t2 - $t0" | bc)")

    "$IMGCONV" cache evict "$ID" 2>/dev/null || true
    sync
    c0=$(cpu_of $agent)
    t0=$(now)
    "$IMGCONV" cache fetch --wait "$ID" >/dev/null 2>&1
    t1=$(now)
    c1=$(cpu_of $agent)
    ours+=("$(echo "$t1 - $t0" | bc)")
    ours_cpu+=("$(echo "scale=2; ($c1 - $c0) / $hz" | bc)")
    echo "run $i: curl|tee|sha512sum ${peer[-1]} s (+sync ${peer_sync[-1]} s), imgconv agent ${ours[-1]} s (cpu ${ours_cpu[-1]} s)" >&2
done
rss=$(awk '/VmHWM/{print int($2/1024)}' "/proc/$agent/status")
p=$(printf '%s\n' "${peer[@]}" | median)
ps=$(printf '%s\n' "${peer_sync[@]}" | median)
o=$(printf '%s\n' "${ours[@]}" | median)
oc=$(printf '%s\n' "${ours_cpu[@]}" | median)
echo "image: 1 GiB raw ($ID), $runs runs, medians"
printf "%-44s %8s\n" "curl | tee FILE | sha512sum" "$p s"
printf "%-44s %8s\n" "curl | tee FILE | sha512sum; sync FILE" "$ps s"
printf "%-44s %8s  cpu %s s, agent peak RSS %s MiB\n" "imgconv agent (sha512, inspect, fsync)" "$o s" "$oc" "$rss"
echo "ratio (peer time / imgconv time): $(echo "scale=2; $p / $o" | bc)x against curl|tee|sha512sum, $(echo "scale=2; $ps / $o" | bc)x against it plus sync"
