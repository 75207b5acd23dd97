#!/usr/bin/env bash
# A real, throwaway single-node Ceph 16 cluster for the RBD tests and benchmarks: one mon, one mgr and one
# BlueStore OSD on a sparse file, cephx on, listening on 127.0.0.1 only, all state in one directory; and a RADOS
# Gateway (beast frontend, path-style S3) with one S3 user, the S3 server behind Glance's s3 store.
#
#   scripts/ceph-cluster.sh start   create and start (about 20 s); refuses if a cluster is already running there
#   scripts/ceph-cluster.sh stop    stop exactly this cluster's daemons (OSD and mgr first, the mon last) and
#                                   remove its directory
#   scripts/ceph-cluster.sh env     print the env file path
#   scripts/ceph-cluster.sh rgw-stop|rgw-kill|rgw-start   stop (SIGTERM), kill (SIGKILL: a crash) or start the
#                                   gateway alone (tests cut S3 off in the middle of a download)
#   scripts/ceph-cluster.sh rgw-gc  free now what deleted S3 objects hold (the gateway frees it lazily: a run of
#                                   benchmarks that uploads and deletes GiBs would fill the OSD before its GC ran)
#
# Settings (environment): IMGCONV_CEPH_DIR (default /tmp/imgconv-ceph), CEPH_PORT (13300: mon msgr2; +1 msgr1),
# CEPH_PORT_RANGE ("13400 13500": OSD and mgr), CEPH_RGW_PORT (13380: the gateway's HTTP port),
# CEPH_OSD_SIZE (bytes, default 20 GiB, sparse). Keep the ports
# below the kernel's ephemeral range (32768-60999): an outgoing connection can hold a port there, and the mon
# then fails to bind it although nothing listens.
#
# After start, $IMGCONV_CEPH_DIR/env holds: CEPH_CONF, CEPH_FSID, CEPH_ADMIN_KEYRING, and the restricted user
# the agent uses, as an operator would create it (`profile rbd` on vms, `profile rbd-read-only` on images and
# on the volume pools volumes-fast and volumes-slow):
# CEPH_USER=imgconv, CEPH_USER_KEYRING; and the gateway: RGW_ENDPOINT (http://127.0.0.1:PORT), RGW_ACCESS_KEY,
# RGW_SECRET_KEY (the S3 user `imgconv-test`, made with radosgw-admin user create).
set -euo pipefail
DIR=${IMGCONV_CEPH_DIR:-/tmp/imgconv-ceph}
PORT=${CEPH_PORT:-13300}
read -r PMIN PMAX <<<"${CEPH_PORT_RANGE:-13400 13500}"
OSD_SIZE=${CEPH_OSD_SIZE:-21474836480}
RGW_PORT=${CEPH_RGW_PORT:-13380}
RGW_ACCESS_KEY=IMGCONVTESTACCESS001
RGW_SECRET_KEY=imgconvtestsecret0000000000000000000001
POOLS="vms images volumes-fast volumes-slow"
IP=127.0.0.1
CONF=$DIR/ceph.conf

log() { printf '[ceph-cluster %5ss] %s\n' "$SECONDS" "$*" >&2; }

# A daemon of THIS cluster: its pid file names a live ceph-* or radosgw process started with our ceph.conf.
ours() {
    local pid=$1
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */ceph-* || "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */radosgw ]] &&
        tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qx "$CONF"
}

stop_daemons() {  # names...: SIGTERM, wait up to 15 s, then SIGKILL
    local pids=() name pid
    for name in "$@"; do
        [ -f "$DIR/run/$name.pid" ] || continue
        pid=$(cat "$DIR/run/$name.pid")
        if [ -n "$pid" ] && ours "$pid"; then kill -TERM "$pid" 2>/dev/null && pids+=("$pid"); fi
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for _ in $(seq 1 150); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

stop() {
    [ -d "$DIR" ] || return 0
    stop_daemons client.rgw.a
    stop_daemons osd.0 mgr.x
    stop_daemons mon.a
    rm -rf "$DIR"
    log "stopped"
}

# The RADOS Gateway: its own cephx key, its zone pools at the cluster's 8 PGs each (the compiled default, 32,
# would give its seven pools most of the PGs one OSD may hold), beast on 127.0.0.1, settings on the command line
# (the pid file comes from [global]), then the S3 user. Path-style buckets need nothing: RGW serves them unless
# rgw_dns_name is set.
start_rgw() {
    ceph auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' -o "$DIR/ceph.client.rgw.a.keyring"
    for p in .rgw.root default.rgw.control default.rgw.meta default.rgw.log default.rgw.buckets.index \
             default.rgw.buckets.data default.rgw.buckets.non-ec; do
        ceph osd pool create "$p" 8 8 replicated >/dev/null 2>&1
        ceph osd pool application enable "$p" rgw >/dev/null 2>&1
    done
    run_rgw
    radosgw-admin -c "$CONF" user create --uid=imgconv-test --display-name="imgconv tests" \
        --access-key="$RGW_ACCESS_KEY" --secret-key="$RGW_SECRET_KEY" >"$DIR/log/rgw-user.json"
    log "rgw up on $IP:$RGW_PORT"
}

# The gateway daemon alone (also `rgw-start` after `rgw-stop`: tests stop it in the middle of a download).
run_rgw() {
    # The daemon keeps whatever descriptors it inherits: close all but 0-2 (a caller's pipe would never see EOF).
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec radosgw -c "$CONF" -n client.rgw.a --rgw-frontends "beast endpoint=$IP:$RGW_PORT" --rgw-data "$DIR/rgw.a" \
            --rgw-thread-pool-size 32 --rgw-gc-obj-min-wait 60 --rgw-gc-processor-period 60 </dev/null >>"$DIR/log/rgw.stderr" 2>&1
    )
    local code=000
    for i in $(seq 1 240); do
        code=$(curl -m 5 -s -o /dev/null -w '%{http_code}' "http://$IP:$RGW_PORT/" || true)
        [ "$code" = 200 ] && return 0
        sleep 0.5
    done
    echo "the RADOS Gateway did not answer 200 within 120 s (last: $code)" >&2
    exit 1
}

start() {
    if [ -f "$DIR/run/mon.a.pid" ] && ours "$(cat "$DIR/run/mon.a.pid")"; then
        echo "a cluster is already running in $DIR (scripts/ceph-cluster.sh stop first)" >&2
        exit 1
    fi
    for p in "$PORT" "$((PORT + 1))" "$RGW_PORT"; do
        if (exec 3<>"/dev/tcp/$IP/$p") 2>/dev/null; then
            echo "port $IP:$p is in use: set CEPH_PORT to a free port" >&2
            exit 1
        fi
    done
    rm -rf "$DIR"
    mkdir -p "$DIR"/{run,log,crash,mon.a,osd.0,mgr.x,rgw.a}
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed (rc=$rc); logs were in $DIR/log"; tail -n 20 "$DIR"/log/*.log >&2 || true; stop; fi' EXIT
    export CEPH_CONF=$CONF
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:$IP:$PORT,v1:$IP:$((PORT + 1))]
public addr = $IP
cluster addr = $IP
ms bind ipv6 = false
ms bind port min = $PMIN
ms bind port max = $PMAX
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$cluster-\$name.asok
crash dir = $DIR/crash
log file = $DIR/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# the CI disk may be fuller than the 30% the mon warns at by default
mon data avail warn = 2
mon data avail crit = 1
rbd default features = layering
# faster settling: stats every second, pool changes committed every 0.1 s
mgr stats period = 1
mon mgr digest period = 1

[mon]
mon data = $DIR/mon.\$id
mon cluster log file = $DIR/log/cluster.log
paxos propose interval = 0.1
paxos min wait = 0.01

[mgr]
mgr data = $DIR/mgr.\$id
keyring = $DIR/mgr.\$id/keyring

[osd]
osd data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_SIZE
bluestore block preallocate file = false
bluestore fsck on mkfs = false
osd memory target = 1073741824
# A killed client's watches (and so its hold on an open image) expire after 5 s instead of 30 s: the tests kill
# agents mid-import and wait for that.
osd client watch timeout = 5

[client]
keyring = $DIR/\$cluster.\$name.keyring
log file = $DIR/log/client.\$name.\$pid.log
admin socket =
EOF
    local admin=$DIR/ceph.client.admin.keyring
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$admin" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$DIR/mon.keyring" --import-keyring "$admin" >/dev/null
    chmod 0644 "$admin"

    monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:$IP:$PORT,v1:$IP:$((PORT + 1))]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
    ceph-mon -c "$CONF" -i a
    for i in $(seq 1 60); do
        ceph --connect-timeout 5 mon stat >/dev/null 2>&1 && break
        [ "$i" = 60 ] && { echo "the mon did not answer within 30 s" >&2; exit 1; }
        sleep 0.5
    done
    log "mon up"

    ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' -o "$DIR/mgr.x/keyring"
    ceph-mgr -c "$CONF" -i x

    local osd_uuid osd_key
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    osd_key=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$osd_key" >"$DIR/osd.0/new.json"
    [ "$(ceph osd new "$osd_uuid" -i "$DIR/osd.0/new.json")" = 0 ] || { echo "unexpected OSD id" >&2; exit 1; }
    rm -f "$DIR/osd.0/new.json"
    printf '[osd.0]\n\tkey = %s\n' "$osd_key" >"$DIR/osd.0/keyring"
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$DIR/log/osd-mkfs.out" 2>&1 ||
        { cat "$DIR/log/osd-mkfs.out" >&2; exit 1; }
    ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd.stderr"
    for i in $(seq 1 120); do
        ceph osd dump 2>/dev/null | grep -q '^osd.0 up' && break
        [ "$i" = 120 ] && { echo "the OSD did not come up within 60 s" >&2; exit 1; }
        sleep 0.5
    done
    log "osd up"

    for p in $POOLS; do ceph osd pool create "$p" 8 8 replicated >/dev/null 2>&1; done
    for p in $POOLS; do rbd pool init "$p"; done
    # The agent's user, as in README "Ceph set-up": profile rbd on vms, read-only on Glance's images (clones of
    # Glance's snapshots need no more: the child is registered in the child's pool) and on Cinder's volume pools
    # (volumes-fast, volumes-slow: the cinder fixture's backends), which it copies bases from.
    ceph auth get-or-create client.imgconv mon 'profile rbd' \
        osd 'profile rbd pool=vms, profile rbd-read-only pool=images, profile rbd-read-only pool=volumes-fast, profile rbd-read-only pool=volumes-slow' \
        mgr 'profile rbd pool=vms' \
        -o "$DIR/ceph.client.imgconv.keyring"
    chmod 0644 "$DIR/ceph.client.imgconv.keyring"
    log "pools $POOLS ready"

    start_rgw

    local deadline=$((SECONDS + 90))
    until ceph mgr stat 2>/dev/null | grep -q '"available": true' || [ $SECONDS -ge $deadline ]; do sleep 0.5; done
    until ceph pg stat 2>/dev/null | grep -Eq '^([0-9]+) pgs: \1 active\+clean;' || [ $SECONDS -ge $deadline ]; do sleep 0.5; done
    cat >"$DIR/env" <<EOF
CEPH_CONF=$CONF
CEPH_FSID=$fsid
CEPH_ADMIN_KEYRING=$admin
CEPH_USER=imgconv
CEPH_USER_KEYRING=$DIR/ceph.client.imgconv.keyring
RGW_ENDPOINT=http://$IP:$RGW_PORT
RGW_ACCESS_KEY=$RGW_ACCESS_KEY
RGW_SECRET_KEY=$RGW_SECRET_KEY
EOF
    trap - EXIT
    log "ready: $(ceph health 2>&1 | head -1)"
    echo "$DIR/env"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "$DIR/env" ;;
    rgw-stop) stop_daemons client.rgw.a ;;
    rgw-kill) pid=$(cat "$DIR/run/client.rgw.a.pid" 2>/dev/null || true)
              if [ -n "$pid" ] && ours "$pid"; then kill -KILL "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; fi ;;
    rgw-start) pid=$(cat "$DIR/run/client.rgw.a.pid" 2>/dev/null || true)
               if [ -n "$pid" ] && ours "$pid"; then exit 0; fi
               CEPH_CONF=$CONF run_rgw ;;
    rgw-gc) radosgw-admin -c "$CONF" --id admin --keyring "$DIR/ceph.client.admin.keyring" gc process --include-all ;;
    *) echo "usage: $0 start|stop|env|rgw-stop|rgw-kill|rgw-start|rgw-gc" >&2; exit 2 ;;
esac
