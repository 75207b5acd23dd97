#!/usr/bin/env bash
# Boot disks from every store of a multi-store Glance (file1, ceph1, s3rgw on the cluster's RADOS Gateway, web:
# http), on the real fixtures, in one run:
#   - first instance (nothing cached, no base) and second instance of a raw image in each store;
#   - for the raw image in the s3 store: copy-to-store (Glance copies it into ceph1, the disk clones the copy)
#     against the base path (download, stream into a base, clone), and against Nova's path for a raw image that
#     is not in its rbd store (download to a file, rbd import), each on a fresh upload, in an order that rotates
#     every run.
# Medians of N runs (default 5) after one uncounted warm-up round. The image is a mixed raw file of SIZE MiB
# (default 256) cut from bench/make-corpus.sh's corpus. Starts the fixtures if they are not running.
# Usage: bench/stores.sh [runs] [size MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
mib=${2:-256}
dir=/tmp/imgconv-bench
bash bench/make-corpus.sh "$dir" >/dev/null
. bench/fixtures.sh
bench_fixtures GLANCE_S3_STORE
work=$dir/stores
rm -rf "$work"; mkdir -p "$work"
head -c $((mib << 20)) "$dir/mixed.raw" >"$work/image.raw"
sha=$(sha512sum "$work/image.raw" | cut -d' ' -f1)

glance() { curl -sf -H "X-Auth-Token: $TOK" "$@"; }
created=()
upload() {  # store -> image id (the web store: the file is served by the fixture's web server, registered by URL)
    local id
    id=$(glance -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' \
        -d '{"name":"bench-stores","disk_format":"raw","container_format":"bare"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
    created+=("$id")
    if [ "$1" = "$GLANCE_WEB_STORE" ]; then
        cp "$work/image.raw" "$GLANCE_WEB_DIR/$id.img"
        glance -X POST "$GLANCE_URL/v2/images/$id/locations" -H 'Content-Type: application/json' \
            -d "{\"url\":\"$GLANCE_WEB_URL/$id.img\",\"validation_data\":{\"os_hash_algo\":\"sha512\",\"os_hash_value\":\"$sha\"}}" >/dev/null
        for _ in $(seq 300); do
            [ "$(glance "$GLANCE_URL/v2/images/$id" | python3 -c 'import json,sys;print(json.load(sys.stdin)["status"])')" = active ] && break
            sleep 0.1
        done
    else
        glance -X PUT "$GLANCE_URL/v2/images/$id/file" -H 'Content-Type: application/octet-stream' \
            -H "X-Image-Meta-Store: $1" -T "$work/image.raw" >/dev/null
    fi
    echo "$id"
}

agent_conf() {  # name [extra [glance] lines]
    cat >"$work/$1.conf" <<EOF
[agent]
socket_path = $work/$1.sock
state_dir = $work/$1-state
[glance]
auth_url = $KEYSTONE_URL
username = admin
password = secret
project_name = admin
$2
[cache]
directory = $work/$1-cache
max_size = 8G
[rbd]
ceph_conf = $CEPH_CONF
user = $CEPH_USER
keyring = $CEPH_USER_KEYRING
[disks]
gc_interval = 0
EOF
}
agent_conf plain ""
agent_conf copy "copy_to_store = $GLANCE_RBD_STORE"
pids=()
for a in plain copy; do
    "$IMGCONV" agent --config "$work/$a.conf" --log-level warning 2>"$work/$a.log" &
    pids+=($!)
done
cleanup() {
    [ -f "$work/plain.log" ] && [ -s "$work/plain.log" ] && { echo "plain agent's log:"; tail -5 "$work/plain.log"; } >&2
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    bench_remove_disks
    for id in "${created[@]}"; do glance -X DELETE "$GLANCE_URL/v2/images/$id" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT
for a in plain copy; do for _ in $(seq 100); do [ -S "$work/$a.sock" ] && break; sleep 0.1; done; done
create() {  # agent image -> "seconds disk method"
    local inst t0 out
    inst=$(cat /proc/sys/kernel/random/uuid)
    t0=$(date +%s.%N)
    out=$(curl -sS -f -m 3600 --unix-socket "$work/$1.sock" -X POST -H 'Content-Type: application/json' \
        -d "{\"instance_uuid\":\"$inst\",\"image_id\":\"$2\"}" http://a/v1/disks)
    echo "$(echo "$(date +%s.%N) - $t0" | bc) ${inst}_disk $(echo "$out" | python3 -c 'import json,sys;print(json.load(sys.stdin)["method"])')"
}
remove() { curl -sf --unix-socket "$work/$1.sock" -X DELETE "http://a/v1/disks/$2" >/dev/null; }
gc() { curl -sf --unix-socket "$work/$1.sock" -X POST "http://a/v1/bases/gc?idle=0&image=$2" >/dev/null; }
settle() { sync; sleep 2; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A first second
stores=(file1 "$GLANCE_RBD_STORE" "$GLANCE_S3_STORE" "$GLANCE_WEB_STORE")
declare -A ids
for s in "${stores[@]}"; do ids[$s]=$(upload "$s"); done
copy=() base=() nova=() novav=()
for i in $(seq 0 "$runs"); do
    for s in "${stores[@]}"; do
        id=${ids[$s]}
        settle
        read -r t1 d1 m1 < <(create plain "$id")
        read -r t2 d2 m2 < <(create plain "$id")
        want=base-built; [ "$s" = "$GLANCE_RBD_STORE" ] && want=glance-clone
        [ "$m1" = "$want" ] || { echo "$s: expected $want, got $m1" >&2; exit 1; }
        if [ "$i" -gt 0 ]; then first[$s]+="$t1 "; second[$s]+="$t2 "; fi
        remove plain "$d1"; remove plain "$d2"; gc plain "$id"
        curl -sf --unix-socket "$work/plain.sock" -X DELETE "http://a/v1/images/$id" >/dev/null 2>&1 || true
    done
    # A raw image in the s3 store, a fresh upload per path (nothing of it cached anywhere): copy-to-store (Glance
    # copies it into ceph1, the disk clones the copy), the base path, Nova's path as a command line (download,
    # rbd import) and as nova-compute runs it (glanceclient verifies os_hash_value while it downloads, the file
    # is fsynced, then rbd import), in an order that rotates every run so that no path always goes first.
    cid=$(upload "$GLANCE_S3_STORE") bid=$(upload "$GLANCE_S3_STORE") nid=$(upload "$GLANCE_S3_STORE") vid=$(upload "$GLANCE_S3_STORE")
    paths=(copy base nova novav)
    for k in 0 1 2 3; do
        settle
        case ${paths[$(( (i + k) % 4 ))]} in
        copy)
            read -r t d m < <(create copy "$cid")
            [ "$m" = copy-to-store ] || { echo "expected copy-to-store, got $m" >&2; exit 1; }
            [ "$i" -gt 0 ] && copy+=("$t")
            remove copy "$d" ;;
        base)
            read -r t d m < <(create plain "$bid")
            [ "$m" = base-built ] || { echo "expected base-built, got $m" >&2; exit 1; }
            [ "$i" -gt 0 ] && base+=("$t")
            remove plain "$d"; gc plain "$bid" ;;
        nova)
            t0=$(date +%s.%N)
            glance "$GLANCE_URL/v2/images/$nid/file" -o "$work/nova.raw"
            "${RBD[@]}" import --no-progress --image-format 2 "$work/nova.raw" "vms/bench-nova-$i" >/dev/null
            [ "$i" -gt 0 ] && nova+=("$(echo "$(date +%s.%N) - $t0" | bc)")
            rm -f "$work/nova.raw"; "${RBD[@]}" rm --no-progress "vms/bench-nova-$i" >/dev/null ;;
        novav)
            t0=$(date +%s.%N)
            got=$(glance "$GLANCE_URL/v2/images/$vid/file" | tee "$work/nova.raw" | sha512sum | cut -d' ' -f1)
            [ "$got" = "$sha" ] || { echo "Nova path: sha512 mismatch" >&2; exit 1; }
            sync "$work/nova.raw"
            "${RBD[@]}" import --no-progress --image-format 2 "$work/nova.raw" "vms/bench-nova-v-$i" >/dev/null
            [ "$i" -gt 0 ] && novav+=("$(echo "$(date +%s.%N) - $t0" | bc)")
            rm -f "$work/nova.raw"; "${RBD[@]}" rm --no-progress "vms/bench-nova-v-$i" >/dev/null ;;
        esac
    done
    for x in "$cid" "$bid" "$nid" "$vid"; do glance -X DELETE "$GLANCE_URL/v2/images/$x" >/dev/null 2>&1 || true; done
    bash scripts/ceph-cluster.sh rgw-gc >/dev/null 2>&1 || true  # four uploads a run: free them before the OSD fills
done
m() { printf '%s\n' $@ | median; }
echo "image: raw, $mib MiB (mixed data and zeros); medians of $runs"
echo "| store | first instance (s) | method | second instance (s) |"
echo "|---|---|---|---|"
for s in "${stores[@]}"; do
    want=base-built; [ "$s" = "$GLANCE_RBD_STORE" ] && want=glance-clone
    echo "| $s | $(m ${first[$s]}) | $want | $(m ${second[$s]}) |"
done
c=$(m "${copy[@]}") b=$(m "${base[@]}") n=$(m "${nova[@]}") v=$(m "${novav[@]}")
echo
echo "| raw image in $GLANCE_S3_STORE, first instance | seconds | this / base | this / copy-to-store |"
echo "|---|---|---|---|"
printf '| copy-to-store (Glance copies into %s, the disk clones the copy) | %s | %.2fx | 1.00x |\n' "$GLANCE_RBD_STORE" "$c" "$(echo "$c / $b" | bc -l)"
printf '| base path (download, verify, stream into a base, clone) | %s | 1.00x | %.2fx |\n' "$b" "$(echo "$b / $c" | bc -l)"
printf '| Nova as nova-compute runs it (verified download, fsync, rbd import) | %s | %.2fx | %.2fx |\n' "$v" "$(echo "$v / $b" | bc -l)" "$(echo "$v / $c" | bc -l)"
printf '| Nova as a command line (curl, rbd import; nothing verified) | %s | %.2fx | %.2fx |\n' "$n" "$(echo "$n / $b" | bc -l)" "$(echo "$n / $c" | bc -l)"
echo "all runs: copy ${copy[*]}; base ${base[*]}; nova-compute ${novav[*]}; nova-cli ${nova[*]}"
