#!/usr/bin/env bash
# A real Cinder 29 (PyPI: cinder-api, cinder-scheduler, cinder-volume) with two RBD backends on the test Ceph
# cluster, RabbitMQ (Debian rabbitmq-server) for its RPC and sqlite for its database, registered in the fixture's
# Keystone as `volumev3` and `block-storage`. scripts/openstack-fixture.sh runs it between Keystone and Glance
# (Glance's cinder stores check the volume types at start-up) and stops it after Glance; it is not meant to be
# run alone.
#
#   cinder-fixture.sh start   (env: CINDER_BASE, VENV, KS_PORT, ADMIN_TOKEN (Keystone's admin), CEPH_ENV, GLANCE_PORT, PINS: the venv's
#                              constraints file, to which scripts/cinder-constraints.txt is added)  writes $CINDER_BASE/env
#   cinder-fixture.sh stop    (env: CINDER_BASE)
#
# Backends rbd-fast (pool volumes-fast) and rbd-slow (volumes-slow; scripts/ceph-cluster.sh makes both pools),
# volume types glance-fast and glance-slow bound to them, cephx user client.cinder (`profile rbd` on both pools;
# keyring in $CINDER_BASE/etc/ceph-client, which Glance sees as /etc/ceph: os-brick's RBD connector reads
# /etc/ceph/ceph.client.cinder.keyring and gives glance_store a librbd file, no kernel rbd).
# Keystone user cinder/cinderpw (admin and service in project service).
# Ports (below 32768: epmd refuses a port held in TIME_WAIT by some client's ephemeral port): CINDER_PORT 8776,
# RABBIT_PORT 5682, epmd RABBIT_PORT+10000, Erlang distribution RABBIT_PORT+20000.
# The recipe and its traps: ../shared/reference/cinder-test/REPORT.md (sqlite transactions start with BEGIN
# IMMEDIATE (scripts/sqlite_immediate.py): concurrent writers otherwise fail at once with "database is locked";
# the services start one after the other; unlimited quotas, as every image volume lands in project service).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${CINDER_BASE:?CINDER_BASE}
CINDER_PORT=${CINDER_PORT:-8776}
RABBIT_PORT=${RABBIT_PORT:-5682}
RABBIT_EPMD_PORT=$((RABBIT_PORT + 10000))
RABBIT_DIST_PORT=$((RABBIT_PORT + 20000))
RABBIT_NODENAME=rabbit-imgconv@localhost
RBD_USER=cinder
SECRET_UUID=6a2f9a8e-3c4b-4f43-9d2e-5b7c1e0f4a11
HOST=imgconvtest
ETC=$BASE/etc STATE=$BASE/state LOG=$BASE/log RUN=$BASE/run RMQ=$BASE/rabbitmq PYLIB=$BASE/pylib

log() { printf '[cinder-fixture %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() { echo "cinder-fixture: $*" >&2; exit 1; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A process of this fixture: alive (zombies count as gone) and its cwd, cmdline or environment under $BASE.
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
ours() {
    [[ "$(readlink "/proc/$1/cwd" 2>/dev/null)" == "$BASE"* ]] && return 0
    tr '\0' '\n' 2>/dev/null <"/proc/$1/cmdline" | grep -qF "$BASE" && return 0
    tr '\0' '\n' 2>/dev/null <"/proc/$1/environ" | grep -qF "$BASE"
}
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }

stop_pidfile() {  # name: TERM it and (cinder's oslo.service workers) its children at once; KILL after 15 s
    local f=$RUN/$1.pid pid kids k
    [ -f "$f" ] || return 0
    pid=$(cat "$f"); rm -f "$f"
    alive "$pid" && ours "$pid" || return 0
    kids=$(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    case "$1" in cinder-*) for k in $kids; do ours "$k" && kill -TERM "$k" 2>/dev/null || true; done ;; esac
    for _ in $(seq 1 150); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    for k in $kids; do
        for _ in $(seq 1 50); do alive "$k" || break; sleep 0.1; done
        alive "$k" && ours "$k" && kill -KILL "$k" 2>/dev/null || true
    done
    echo "$1 stopped"
}

stop() {
    [ -d "$BASE" ] || return 0
    local n
    for n in cinder-volume cinder-scheduler cinder-api; do stop_pidfile "$n" & done
    wait
    stop_pidfile rabbitmq
    stop_pidfile epmd
    rm -f "$BASE/env"
}

start() {
    : "${VENV:?VENV}" "${KS_PORT:?KS_PORT}" "${ADMIN_TOKEN:?ADMIN_TOKEN}" "${CEPH_ENV:?CEPH_ENV}" "${GLANCE_PORT:?GLANCE_PORT}" "${PINS:?PINS}"
    local n p
    for n in rabbitmq epmd cinder-api cinder-scheduler cinder-volume; do
        [ -f "$RUN/$n.pid" ] && alive "$(cat "$RUN/$n.pid")" && die "$n already runs; stop first"
    done
    for p in "$RABBIT_PORT" "$RABBIT_EPMD_PORT" "$RABBIT_DIST_PORT" "$CINDER_PORT"; do
        port_busy "$p" && die "127.0.0.1:$p is in use"
    done
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || die "no RabbitMQ: apt-get install rabbitmq-server (scripts/install-deps.sh)"
    if ! "$VENV/bin/python" -c 'import cinder, cinderclient, os_brick, oslo_privsep' 2>/dev/null; then
        log "installing cinder, os-brick and python-cinderclient into $VENV (pinned by scripts/cinder-constraints.txt)"
        cat "$PINS" "$HERE/cinder-constraints.txt" >"$BASE.constraints.txt"
        "$VENV/bin/pip" install -q -c "$BASE.constraints.txt" cinder python-cinderclient os-brick oslo.privsep oslo.rootwrap
    fi
    rm -rf "$ETC" "$STATE" "$LOG" "$RMQ" "$PYLIB" "$BASE/env"
    mkdir -p "$ETC/ceph-client" "$STATE/lock" "$LOG" "$RUN" "$RMQ/home" "$RMQ/mnesia" "$RMQ/log" "$PYLIB"
    # gunicorn and python put the start directory on sys.path: never start from /tmp (a stray http.py there).
    cd "$BASE"
    trap 'rc=$?; [ $rc -eq 0 ] || { echo "cinder-fixture: start failed (rc $rc); logs in $LOG" >&2; stop >&2; }' EXIT

    # ---- Ceph: Cinder's cephx user on both pools, and Cinder's ceph.conf (the cluster's plus that keyring).
    local CEPH_CONF CEPH_ADMIN_KEYRING
    eval "$(grep -E '^(CEPH_CONF|CEPH_ADMIN_KEYRING)=' "$CEPH_ENV")"
    local ceph=(env -u CEPH_ARGS ceph -c "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" --connect-timeout 15)
    local keyring=$ETC/ceph-client/ceph.client.$RBD_USER.keyring caps="profile rbd pool=volumes-fast, profile rbd pool=volumes-slow"
    "${ceph[@]}" osd pool ls | grep -qx volumes-fast || die "the cluster has no pool volumes-fast (scripts/ceph-cluster.sh makes it)"
    "${ceph[@]}" auth get-or-create "client.$RBD_USER" mon 'profile rbd' osd "$caps" mgr "$caps" -o "$keyring" >/dev/null
    chmod 0644 "$keyring"
    { cat "$CEPH_CONF"; printf '\n[client.%s]\nkeyring = %s\nadmin socket =\n' "$RBD_USER" "$keyring"; } >"$ETC/ceph.conf"

    # ---- RabbitMQ as root with its own epmd, HOME, mnesia and logs (not /usr/sbin/rabbitmq-server, which su's to
    # the rabbitmq user and uses /var/lib/rabbitmq); vhost, user and permissions from rabbitmq.conf.
    cat >"$RMQ/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$RABBIT_PORT
default_vhost = cinder
default_user = cinder
default_pass = cinderpw
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
log.console = false
log.file.level = warning
EOF
    echo '[].' >"$RMQ/enabled_plugins"
    : >"$RMQ/rabbitmq-env.conf"
    local epmd
    epmd=$(command -v epmd || ls /usr/lib/erlang/erts-*/bin/epmd | head -1)
    ( cd "$RMQ" && exec env ERL_EPMD_PORT="$RABBIT_EPMD_PORT" setsid "$epmd" -port "$RABBIT_EPMD_PORT" -address 127.0.0.1 \
        >"$RMQ/log/epmd.log" 2>&1 </dev/null ) &
    echo $! >"$RUN/epmd.pid"
    for _ in $(seq 1 40); do port_busy "$RABBIT_EPMD_PORT" && break; sleep 0.25; done
    port_busy "$RABBIT_EPMD_PORT" || die "epmd did not listen on 127.0.0.1:$RABBIT_EPMD_PORT"
    ( cd "$RMQ" && exec env HOME="$RMQ/home" ERL_EPMD_PORT="$RABBIT_EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_NODENAME="$RABBIT_NODENAME" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RABBIT_PORT" \
        RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT" RABBITMQ_MNESIA_BASE="$RMQ/mnesia" RABBITMQ_LOG_BASE="$RMQ/log" \
        RABBITMQ_CONFIG_FILE="$RMQ/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ/enabled_plugins" RABBITMQ_CONF_ENV_FILE="$RMQ/rabbitmq-env.conf" \
        RABBITMQ_PID_FILE="$RMQ/beam.pid" RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        setsid /usr/lib/rabbitmq/bin/rabbitmq-server >"$RMQ/log/stdout.log" 2>&1 </dev/null ) &
    echo $! >"$RUN/rabbitmq.pid"
    for _ in $(seq 1 240); do
        port_busy "$RABBIT_PORT" && break
        alive "$(cat "$RUN/rabbitmq.pid")" || { tail -20 "$RMQ/log/stdout.log" >&2; die "rabbitmq-server exited"; }
        sleep 0.25
    done
    port_busy "$RABBIT_PORT" || die "RabbitMQ did not open 127.0.0.1:$RABBIT_PORT in 60 s (see $RMQ/log)"
    "$VENV/bin/python" -c "
import kombu
c = kombu.Connection('amqp://cinder:cinderpw@127.0.0.1:$RABBIT_PORT/cinder', connect_timeout=10)
c.connect(); c.release()" >"$LOG/rabbit-check.log" 2>&1 || die "AMQP login to 127.0.0.1:$RABBIT_PORT failed (see $LOG/rabbit-check.log)"
    log "rabbitmq on 127.0.0.1:$RABBIT_PORT"

    # ---- Keystone: the cinder user, and volumev3 + block-storage endpoints.
    local K=http://127.0.0.1:$KS_PORT/v3 adm=$ADMIN_TOKEN
    local H=(-H "X-Auth-Token: $adm" -H 'Content-Type: application/json')
    kget() { curl -m 30 -sf "$K/$1" "${H[@]}" | "$VENV/bin/python" -c "import json,sys;print(json.load(sys.stdin)['$2'][0]['id'])"; }
    kpost() { curl -m 30 -sf -X POST "$K/$1" "${H[@]}" -d "$2" | "$VENV/bin/python" -c "import json,sys;print(json.load(sys.stdin)['$3']['id'])"; }
    local svc cu sid itf st
    svc=$(kget "projects?name=service" projects)
    cu=$(kpost users '{"user":{"name":"cinder","domain_id":"default","password":"cinderpw"}}' user)
    for r in admin service; do curl -m 30 -sf -X PUT "$K/projects/$svc/users/$cu/roles/$(kget "roles?name=$r" roles)" "${H[@]}"; done
    for st in volumev3 block-storage; do
        sid=$(kpost services "{\"service\":{\"name\":\"cinder-$st\",\"type\":\"$st\"}}" service)
        for itf in public internal admin; do
            kpost endpoints "{\"endpoint\":{\"service_id\":\"$sid\",\"interface\":\"$itf\",\"url\":\"http://127.0.0.1:$CINDER_PORT/v3/%(project_id)s\",\"region_id\":\"RegionOne\"}}" endpoint >/dev/null
        done
    done

    # ---- Cinder's configuration.
    sed "s#/etc/cinder/healthcheck_disable#$STATE/healthcheck_disable#" "$VENV/etc/cinder/api-paste.ini" >"$ETC/api-paste.ini"
    cp "$VENV/etc/cinder/resource_filters.json" "$ETC/resource_filters.json"
    backend() {  # name pool
        cat <<EOF
[$1]
volume_driver = cinder.volume.drivers.rbd.RBDDriver
volume_backend_name = $1
backend_host = $HOST
rbd_pool = $2
rbd_ceph_conf = $ETC/ceph.conf
rbd_cluster_name = ceph
rbd_user = $RBD_USER
rbd_secret_uuid = $SECRET_UUID
rbd_flatten_volume_from_snapshot = false
rbd_store_chunk_size = 4
rados_connect_timeout = 30
report_discard_supported = true
EOF
    }
    cat >"$ETC/cinder.conf" <<EOF
[DEFAULT]
debug = false
log_dir = $LOG
state_path = $STATE
host = $HOST
my_ip = 127.0.0.1
transport_url = rabbit://cinder:cinderpw@127.0.0.1:$RABBIT_PORT/cinder
auth_strategy = keystone
enabled_backends = rbd-fast,rbd-slow
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = $CINDER_PORT
osapi_volume_workers = 1
api_paste_config = $ETC/api-paste.ini
resource_query_filters_file = $ETC/resource_filters.json
rootwrap_config = $VENV/etc/cinder/rootwrap.conf
glance_api_servers = http://127.0.0.1:$GLANCE_PORT
graceful_shutdown_timeout = 5
quota_volumes = -1
quota_snapshots = -1
quota_gigabytes = -1
quota_backups = -1
quota_backup_gigabytes = -1
quota_groups = -1
[database]
connection = sqlite:///$STATE/cinder.sqlite?timeout=30
[oslo_concurrency]
lock_path = $STATE/lock
[coordination]
backend_url = file://$STATE/lock
[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:$KS_PORT
auth_url = http://127.0.0.1:$KS_PORT
auth_type = password
username = cinder
password = cinderpw
project_name = service
user_domain_name = Default
project_domain_name = Default
interface = internal
[oslo_messaging_notifications]
driver = noop

$(backend rbd-fast volumes-fast)

$(backend rbd-slow volumes-slow)
EOF
    cp "$HERE/sqlite_immediate.py" "$PYLIB/"
    cat >"$PYLIB/run_service.py" <<'EOF'
"""run_service.py MODULE PROG [args...]: imports MODULE (cinder.cmd.* monkey-patch eventlet on import), then
sqlite_immediate, then runs MODULE.main() with argv PROG args."""
import importlib
import sys

mod = importlib.import_module(sys.argv[1])
import sqlite_immediate  # noqa: E402,F401
sys.argv = sys.argv[2:]
sys.exit(mod.main())
EOF
    "$VENV/bin/cinder-manage" --config-file "$ETC/cinder.conf" db sync >"$LOG/cinder-manage.log" 2>&1 \
        || die "cinder-manage db sync failed (see $LOG/cinder-manage.log)"

    # ---- The services, one after the other (started together their first writes collide in sqlite).
    launch() {  # name module
        ( cd "$BASE" && exec env -u CEPH_ARGS PYTHONPATH="$PYLIB" setsid "$VENV/bin/python" "$PYLIB/run_service.py" "$2" "$1" \
            --config-file "$ETC/cinder.conf" --log-file "$LOG/$1.log" >"$LOG/$1.out" 2>&1 </dev/null ) &
        echo $! >"$RUN/$1.pid"
    }
    need() { alive "$(cat "$RUN/$1.pid")" || { tail -20 "$LOG/$1.out" "$LOG/$1.log" >&2 || true; die "$1 exited"; }; }
    launch cinder-api cinder.cmd.api
    for _ in $(seq 1 240); do
        [ "$(curl -m 5 -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$CINDER_PORT/" || true)" = 300 ] && break
        need cinder-api; sleep 0.25
    done
    local adminproj C
    adminproj=$(kget "projects?name=admin" projects)
    C=http://127.0.0.1:$CINDER_PORT/v3/$adminproj
    local CH=(-H "X-Auth-Token: $adm" -H 'Content-Type: application/json' -H 'Accept: application/json')
    launch cinder-scheduler cinder.cmd.scheduler
    for _ in $(seq 1 240); do
        grep -q 'cleanup completed' "$LOG/cinder-scheduler.log" 2>/dev/null && break
        need cinder-scheduler; sleep 0.25
    done
    grep -q 'cleanup completed' "$LOG/cinder-scheduler.log" || die "cinder-scheduler not up after 60 s (see $LOG)"
    launch cinder-volume cinder.cmd.volume
    local pools="" want="$HOST@rbd-fast#rbd-fast $HOST@rbd-slow#rbd-slow"
    for _ in $(seq 1 240); do
        need cinder-scheduler; need cinder-volume
        pools=$(curl -m 10 -s "$C/scheduler-stats/get_pools" "${CH[@]}" | "$VENV/bin/python" -c 'import json,sys
try: print(" ".join(sorted(p["name"] for p in json.load(sys.stdin)["pools"])))
except Exception: pass' || true)
        [ "$pools" = "$want" ] && break
        sleep 0.5
    done
    [ "$pools" = "$want" ] || die "the scheduler lists '$pools', not '$want' after 120 s (see $LOG)"
    local t
    for t in fast slow; do
        curl -m 30 -sf -X POST "$C/types" "${CH[@]}" \
            -d "{\"volume_type\":{\"name\":\"glance-$t\",\"os-volume-type-access:is_public\":true,\"extra_specs\":{\"volume_backend_name\":\"rbd-$t\"}}}" \
            >/dev/null || die "cannot create volume type glance-$t"
    done
    cat >"$BASE/env" <<EOF
CINDER_URL=http://127.0.0.1:$CINDER_PORT/v3
CINDER_RBD_USER=$RBD_USER
CINDER_KEYRING_DIR=$ETC/ceph-client
CINDER_POOL_FAST=volumes-fast
CINDER_POOL_SLOW=volumes-slow
CINDER_HOST=$HOST
EOF
    trap - EXIT
    log "cinder on :$CINDER_PORT: pools $pools, types glance-fast glance-slow"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
