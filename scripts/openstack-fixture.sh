#!/usr/bin/env bash
# A real Keystone 30 and Glance 33 (PyPI, under gunicorn, sqlite, file store) on 127.0.0.1, for the agent's
# end-to-end tests and benchmarks. Nothing is mocked: Glance sits behind keystonemiddleware.
#
#   scripts/openstack-fixture.sh start    install (first time, ~1-2 min) and start; prints the env file
#   scripts/openstack-fixture.sh stop     stop both servers (state is kept until the next start)
#   scripts/openstack-fixture.sh env      print the env file path
#   scripts/openstack-fixture.sh token    print an admin token (for scripts that call Glance with curl)
#
# Settings (environment): IMGCONV_FIXTURE_DIR (default /tmp/imgconv-openstack), KEYSTONE_PORT (5050),
# GLANCE_PORT (9292), PYTHON (python3).
# IMGCONV_CEPH_ENV=<scripts/ceph-cluster.sh's env file>: Glance gets a second store, ceph1 (glance_store's rbd
# driver, pool images, cephx user client.glance), as in a Ceph-backed OpenStack: images uploaded with
# `X-Image-Meta-Store: ceph1` get locations rbd://<fsid>/images/<id>/snap. The rbd driver needs Debian's
# python3-rados/python3-rbd, so the venv is then $IMGCONV_FIXTURE_DIR/venv-rbd on /usr/bin/python3 with system
# site packages. With the cluster's RADOS Gateway (RGW_ENDPOINT in that env file) Glance is multi-store, as in
# Glance's own guides: file1 (file, the default), ceph1 (rbd), s3rgw (s3 on the gateway, path-style bucket
# `glance`) and web (http, read-only: images registered by URL from a local HTTP server this script runs on
# WEB_PORT, 13381, serving $IMGCONV_FIXTURE_DIR/state/web). copy-image is an enabled import method (admin-only
# by Glance's default policy). With Ceph a second Glance API, on GLANCE_PRIVATE_PORT (9293), serves the same
# database and stores with show_image_direct_url and show_multiple_locations off, as most clouds run Glance: only a
# user with the service role reads an image's locations there, through GET /v2/images/{id}/locations.
# With Ceph, unless IMGCONV_CINDER=0: a real Cinder (scripts/cinder-fixture.sh: RabbitMQ, cinder-api, -scheduler
# and -volume with two RBD backends, volume types glance-fast and glance-slow) starts between Keystone and Glance,
# and Glance gets two cinder stores, cinder-fast and cinder-slow, each bound to its volume type (glance_store's
# cinder driver; os-brick attaches the RBD volumes through librbd, no kernel rbd). Glance then runs in a private
# mount namespace where /etc/ceph holds Cinder's cephx keyring, which os-brick reads from there (and /run is a
# tmpfs: os-brick's probes write blkid's cache). Every SQLite transaction of Glance and Cinder starts with BEGIN
# IMMEDIATE (scripts/sqlite_immediate.py): concurrent writers otherwise fail with "database is locked".
#
# After start, $IMGCONV_FIXTURE_DIR/env holds what tests need:
#   KEYSTONE_URL, GLANCE_URL, OS_* for the admin and the demo user, GLANCE_STORE_DIR (the file store, so a test can
#   corrupt an image behind Glance's back), GLANCE_ACCESS_LOG (one line per request, to count GET /file);
#   with Ceph GLANCE_RBD_STORE and GLANCE_RBD_FSID; with the gateway GLANCE_S3_STORE, GLANCE_S3_BUCKET,
#   GLANCE_WEB_STORE, GLANCE_WEB_DIR (files put there are served at GLANCE_WEB_URL/<name>); with Ceph
#   GLANCE_PRIVATE_URL and GLANCE_SERVICE_{USERNAME,PASSWORD,PROJECT_NAME} (Glance's own user: admin and service);
#   with Cinder GLANCE_CINDER_STORES (cinder-fast,cinder-slow), CINDER_URL, CINDER_POOL_FAST, CINDER_POOL_SLOW.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${IMGCONV_FIXTURE_DIR:-/tmp/imgconv-openstack}
KS_PORT=${KEYSTONE_PORT:-5050}
G_PORT=${GLANCE_PORT:-9292}
GP_PORT=${GLANCE_PRIVATE_PORT:-9293}
WEB_PORT=${WEB_PORT:-13381}
PY=${PYTHON:-python3}
VENV=$BASE/venv ETC=$BASE/etc STATE=$BASE/state LOG=$BASE/log RUN=$BASE/run
CEPH_ENV=${IMGCONV_CEPH_ENV:-}
CINDER_BASE=$BASE/cinder
CINDER=""
[ -n "$CEPH_ENV" ] && [ "${IMGCONV_CINDER:-1}" != 0 ] && CINDER=1
RGW_ENDPOINT="" RGW_ACCESS_KEY="" RGW_SECRET_KEY=""
VENV_OPTS=()
if [ -n "$CEPH_ENV" ]; then
    [ -r "$CEPH_ENV" ] || { echo "IMGCONV_CEPH_ENV=$CEPH_ENV is not readable (scripts/ceph-cluster.sh start)" >&2; exit 2; }
    PY=/usr/bin/python3 VENV=$BASE/venv-rbd VENV_OPTS=(--system-site-packages)
    eval "$(grep -E '^RGW_(ENDPOINT|ACCESS_KEY|SECRET_KEY)=' "$CEPH_ENV" || true)"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore

token() {  # user password project -> a project-scoped Keystone token
    curl -m 30 -sf -D - -o /dev/null -X POST "http://127.0.0.1:$KS_PORT/v3/auth/tokens" -H 'Content-Type: application/json' \
        -d "{\"auth\":{\"identity\":{\"methods\":[\"password\"],\"password\":{\"user\":{\"name\":\"$1\",\"domain\":{\"id\":\"default\"},\"password\":\"$2\"}}},\"scope\":{\"project\":{\"name\":\"$3\",\"domain\":{\"id\":\"default\"}}}}}" \
        | awk 'tolower($1)=="x-subject-token:"{print $2}' | tr -d '\r'
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_one() {  # pidfile name
    local f=$1 pid kids k
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kids=$(pgrep -P "$pid" || true)
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$pid" 2>/dev/null || true
        for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
        echo "$2 stopped"
    fi
    rm -f "$f"
}

wait_http() {  # url expected-code seconds
    local code=000 deadline=$(( $(date +%s) + $3 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        code=$(curl -m 5 -s -o /dev/null -w '%{http_code}' "$1" || true)
        [ "$code" = "$2" ] && return 0
        sleep 0.25
    done
    echo "$1 did not answer $2 (last: $code)" >&2
    return 1
}

# run_glance CONFIG_DIR PORT THREADS NAME ACCESS_LOG: Glance's API under gunicorn (pid file $RUN/NAME.pid). With
# Cinder, in a private mount namespace: /etc/ceph is Cinder's keyring directory (os-brick's RBD connector reads
# /etc/ceph/ceph.client.cinder.keyring), /run a small tmpfs, /etc/nvme a private copy (os-brick's probes write there).
run_glance() {
    local conf=$1 port=$2 threads=$3 name=$4 access=$5 wrap=()
    if [ -n "$CINDER" ]; then
        local nvme=""
        if [ -d /etc/nvme ]; then nvme=$STATE/etc-nvme; mkdir -p "$nvme"; cp -a /etc/nvme/. "$nvme/"; fi
        mkdir -p /etc/ceph
        wrap=(unshare --mount --propagation private -- sh -c '
            mount --bind "$1" /etc/ceph && mount -t tmpfs -o size=16m,mode=0755 imgconv-glance-run /run || exit 1
            if [ -n "$2" ]; then mount --bind "$2" /etc/nvme || exit 1; fi
            shift 2; exec "$@"' sh "$CINDER_BASE/etc/ceph-client" "$nvme")
    fi
    env -u CEPH_ARGS OS_GLANCE_CONFIG_DIR="$conf" "${wrap[@]}" "$VENV/bin/gunicorn" --daemon --no-control-socket \
        --chdir "$ETC" --pythonpath "$HERE" --bind "127.0.0.1:$port" --workers 1 --threads "$threads" --timeout 600 \
        --pid "$RUN/$name.pid" --access-logfile "$LOG/$access" --error-logfile "$LOG/$name-gunicorn.log" \
        glance_wsgi:application
}

# The privsep-helper daemons Glance's os-brick spawned: they detach (ppid 1); found by their config file.
stop_privsep() {
    local d
    for d in /proc/[0-9]*; do
        tr '\0' '\n' 2>/dev/null <"$d/cmdline" | grep -q 'privsep-helper$' || continue
        tr '\0' '\n' 2>/dev/null <"$d/cmdline" | grep -qF "$ETC/" || continue
        kill -TERM "${d#/proc/}" 2>/dev/null && echo "privsep-helper stopped" || true
    done
}

start() {
    if alive "$RUN/glance.pid" || alive "$RUN/glance-private.pid" || alive "$RUN/keystone.pid" || alive "$RUN/web.pid"; then
        echo "already running; run '$0 stop' first" >&2
        exit 1
    fi
    mkdir -p "$BASE" "$LOG" "$RUN"
    # python and gunicorn put the start directory on sys.path: never start from /tmp (a stray http.py there).
    cd "$BASE"
    if ! "$VENV/bin/python" -c 'import glance, keystone, gunicorn' 2>/dev/null; then
        echo "installing glance, keystone and gunicorn into $VENV (pinned by scripts/openstack-constraints.txt)"
        "$PY" -m venv "${VENV_OPTS[@]}" "$VENV"
        "$VENV/bin/pip" install -q pip==26.3 || true
        "$VENV/bin/pip" install -q -c "$HERE/openstack-constraints.txt" glance keystone gunicorn
    fi
    # glance_store's s3 driver needs boto3, whose botocore pins python-dateutil below openstack-constraints.txt's.
    if [ -n "$RGW_ENDPOINT" ] && ! "$VENV/bin/python" -c 'import boto3' 2>/dev/null; then
        echo "installing boto3 into $VENV (pinned by scripts/openstack-constraints-s3.txt)"
        local pins=$BASE/constraints-s3.txt
        { grep -v -E "^($(grep -oE '^[A-Za-z0-9_.-]+' "$HERE/openstack-constraints-s3.txt" | paste -sd'|'))==" \
            "$HERE/openstack-constraints.txt"; grep -E '==' "$HERE/openstack-constraints-s3.txt"; } >"$pins"
        "$VENV/bin/pip" install -q -c "$pins" boto3 python-dateutil
    fi
    # What later installs into this venv are pinned by (the s3 pins win where they differ).
    local pins=$HERE/openstack-constraints.txt
    [ -z "$RGW_ENDPOINT" ] || pins=$BASE/constraints-s3.txt
    if [ -n "$CEPH_ENV" ] && ! "$VENV/bin/python" -c 'import rados, rbd' 2>/dev/null; then
        echo "$VENV/bin/python cannot import rados, rbd: apt-get install python3-rados python3-rbd" >&2
        exit 1
    fi
    rm -rf "$STATE" "$ETC" "$LOG"/*
    mkdir -p "$STATE/images" "$STATE/web" "$STATE/staging" "$STATE/tasks" "$STATE/cache" "$STATE/keystone/fernet" \
        "$STATE/keystone/credential" "$ETC" "$LOG"

    # ---- Keystone: sqlite, fernet tokens; gunicorn must not hand its argv to oslo.config.
    cat >"$ETC/keystone.conf" <<EOF
[DEFAULT]
log_file = $LOG/keystone.log
[database]
connection = sqlite:///$STATE/keystone/keystone.sqlite?timeout=60
[token]
provider = fernet
expiration = ${KEYSTONE_TOKEN_EXPIRATION:-3600}
[fernet_tokens]
key_repository = $STATE/keystone/fernet
[credential]
key_repository = $STATE/keystone/credential
EOF
    cat >"$ETC/keystone_wsgi.py" <<'EOF'
import sys
sys.argv = sys.argv[:1]
from keystone.server import wsgi
application = wsgi.initialize_public_application()
EOF
    local km=("$VENV/bin/keystone-manage" --config-file "$ETC/keystone.conf")
    {
        "${km[@]}" db_sync
        "${km[@]}" fernet_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)"
        "${km[@]}" credential_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)"
        "${km[@]}" bootstrap --bootstrap-password secret --bootstrap-region-id RegionOne \
            --bootstrap-public-url "http://127.0.0.1:$KS_PORT/v3/" --bootstrap-internal-url "http://127.0.0.1:$KS_PORT/v3/"
    } >>"$LOG/keystone-manage.log" 2>&1
    OS_KEYSTONE_CONFIG_DIR=$ETC "$VENV/bin/gunicorn" --daemon --no-control-socket --chdir "$ETC" \
        --bind "127.0.0.1:$KS_PORT" --workers 1 --threads 4 --timeout 120 --pid "$RUN/keystone.pid" \
        --error-logfile "$LOG/keystone-gunicorn.log" keystone_wsgi:application
    wait_http "http://127.0.0.1:$KS_PORT/v3" 200 120

    local K=http://127.0.0.1:$KS_PORT/v3
    local ADM; ADM=$(token admin secret admin)
    local H=(-H "X-Auth-Token: $ADM" -H 'Content-Type: application/json')
    kpost() { curl -m 30 -sf -X POST "$K/$1" "${H[@]}" -d "$2"; }
    jid() { "$VENV/bin/python" -c "import json,sys;print(json.load(sys.stdin)['$1']['id'])"; }
    role() { curl -m 30 -sf "$K/roles?name=$1" "${H[@]}" | "$VENV/bin/python" -c 'import json,sys;print(json.load(sys.stdin)["roles"][0]["id"])'; }
    local SVC DEMO GU DU IMG
    SVC=$(kpost projects '{"project":{"name":"service","domain_id":"default"}}' | jid project)
    DEMO=$(kpost projects '{"project":{"name":"demo","domain_id":"default"}}' | jid project)
    GU=$(kpost users '{"user":{"name":"glance","domain_id":"default","password":"glancepw"}}' | jid user)
    DU=$(kpost users '{"user":{"name":"demo","domain_id":"default","password":"demopw"}}' | jid user)
    curl -m 30 -sf -X PUT "$K/projects/$SVC/users/$GU/roles/$(role admin)" "${H[@]}"
    curl -m 30 -sf -X PUT "$K/projects/$SVC/users/$GU/roles/$(role service)" "${H[@]}"
    curl -m 30 -sf -X PUT "$K/projects/$DEMO/users/$DU/roles/$(role member)" "${H[@]}"
    IMG=$(kpost services '{"service":{"name":"glance","type":"image"}}' | jid service)
    for iface in public internal; do
        kpost endpoints "{\"endpoint\":{\"service_id\":\"$IMG\",\"interface\":\"$iface\",\"url\":\"http://127.0.0.1:$G_PORT\",\"region_id\":\"RegionOne\"}}" >/dev/null
    done

    # ---- Ceph (with IMGCONV_CEPH_ENV): Glance's own cephx user, as the Glance docs make it; its keyring goes
    # where the cluster's ceph.conf looks for client keyrings.
    local backends=file1:file ceph_section="" ceph_env=""
    if [ -n "$CEPH_ENV" ]; then
        # shellcheck disable=SC1090
        local CEPH_CONF CEPH_ADMIN_KEYRING CEPH_FSID
        eval "$(grep -E '^(CEPH_CONF|CEPH_ADMIN_KEYRING|CEPH_FSID)=' "$CEPH_ENV")"
        env -u CEPH_ARGS ceph -c "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" --connect-timeout 15 \
            auth get-or-create client.glance mon 'profile rbd' osd 'profile rbd pool=images' mgr 'profile rbd pool=images' \
            -o "$(dirname "$CEPH_CONF")/ceph.client.glance.keyring" >/dev/null
        chmod 0644 "$(dirname "$CEPH_CONF")/ceph.client.glance.keyring"
        backends="file1:file, ceph1:rbd"
        ceph_section="[ceph1]
rbd_store_pool = images
rbd_store_user = glance
rbd_store_ceph_conf = $CEPH_CONF
rbd_store_chunk_size = 8
rados_connect_timeout = 30"
        ceph_env="GLANCE_RBD_STORE=ceph1
GLANCE_RBD_FSID=$CEPH_FSID"
    fi
    # ---- The gateway (with IMGCONV_CEPH_ENV from a cluster that runs one): an s3 store on it, and the http store,
    # whose images are URLs on a local web server.
    if [ -n "$RGW_ENDPOINT" ]; then
        backends="$backends, s3rgw:s3, web:http"
        ceph_section="$ceph_section
[s3rgw]
store_description = Ceph RGW (S3), bucket glance
s3_store_host = $RGW_ENDPOINT
s3_store_access_key = $RGW_ACCESS_KEY
s3_store_secret_key = $RGW_SECRET_KEY
s3_store_bucket = glance
s3_store_create_bucket_on_put = true
s3_store_bucket_url_format = path
[web]
store_description = read-only HTTP"
        ceph_env="$ceph_env
GLANCE_S3_STORE=s3rgw
GLANCE_S3_BUCKET=glance
GLANCE_WEB_STORE=web
GLANCE_WEB_DIR=$STATE/web
GLANCE_WEB_URL=http://127.0.0.1:$WEB_PORT"
        (cd "$STATE/web" && exec setsid "$PY" -m http.server "$WEB_PORT" --bind 127.0.0.1 >"$LOG/web.log" 2>&1 &
         echo $! >"$RUN/web.pid")
        wait_http "http://127.0.0.1:$WEB_PORT/" 200 30
    fi

    # ---- Cinder (with Ceph): before Glance, whose cinder stores check their volume types at start-up.
    local cinder_env=""
    if [ -n "$CINDER" ]; then
        CINDER_BASE=$CINDER_BASE VENV=$VENV KS_PORT=$KS_PORT ADMIN_TOKEN=$ADM CEPH_ENV=$CEPH_ENV GLANCE_PORT=$G_PORT PINS=$pins \
            bash "$HERE/cinder-fixture.sh" start
        backends="$backends, cinder-fast:cinder, cinder-slow:cinder"
        local t
        for t in fast slow; do
            ceph_section="$ceph_section
[cinder-$t]
store_description = Cinder volumes of type glance-$t
cinder_volume_type = glance-$t
cinder_catalog_info = volumev3::publicURL
cinder_os_region_name = RegionOne
cinder_store_auth_address = $K
cinder_store_user_name = glance
cinder_store_password = glancepw
cinder_store_project_name = service
cinder_store_user_domain_name = Default
cinder_store_project_domain_name = Default
cinder_use_multipath = false
cinder_enforce_multipath = false
cinder_mount_point_base = $STATE/mnt
cinder_state_transition_timeout = 120
rootwrap_config = $VENV/etc/glance/rootwrap.conf"
        done
        ceph_section="$ceph_section
[oslo_concurrency]
lock_path = $STATE/lock
[privsep_osbrick]
helper_command = $VENV/bin/privsep-helper --config-file $ETC/glance-api.conf"
        cinder_env="GLANCE_CINDER_STORES=cinder-fast,cinder-slow
$(cat "$CINDER_BASE/env")"
    fi

    # ---- Glance: keystone paste flavor, file store, locations shown (the rbd clone path reads them).
    cat >"$ETC/glance-api.conf" <<EOF
[DEFAULT]
debug = false
log_file = $LOG/glance-api.log
enabled_backends = $backends
show_image_direct_url = true
show_multiple_locations = true
enabled_import_methods = [glance-direct,web-download,copy-image]
image_cache_dir = $STATE/cache
worker_self_reference_url = http://127.0.0.1:$G_PORT
[database]
connection = sqlite:///$STATE/glance.sqlite?timeout=60
[glance_store]
default_backend = file1
[file1]
filesystem_store_datadir = $STATE/images
$ceph_section
[os_glance_staging_store]
filesystem_store_datadir = $STATE/staging
[os_glance_tasks_store]
filesystem_store_datadir = $STATE/tasks
[import_filtering_opts]
# lists need the [a,b] form; http locations must pass this filter too
allowed_hosts = [127.0.0.1]
allowed_ports = [80,443,8000,$WEB_PORT]
[paste_deploy]
flavor = keystone
config_file = $ETC/glance-api-paste.ini
[keystone_authtoken]
www_authenticate_uri = $K
auth_url = http://127.0.0.1:$KS_PORT
auth_type = password
username = glance
password = glancepw
project_name = service
user_domain_name = Default
project_domain_name = Default
interface = internal
EOF
    cat >"$ETC/glance-api-paste.ini" <<'EOF'
[composite:glance-api-keystone]
paste.composite_factory = glance.api:root_app_factory
/: api
/healthcheck: healthcheck
[composite:api]
paste.composite_factory = glance.api:pipeline_factory
keystone = http_proxy_to_wsgi versionnegotiation authtoken context rootapp
[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app
[app:apiversions]
paste.app_factory = glance.api.versions:create_resource
[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory
[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = /nonexistent
[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory
[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true
[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
EOF
    "$VENV/bin/glance-manage" --config-file "$ETC/glance-api.conf" db_sync >>"$LOG/glance-manage.log" 2>&1
    printf 'import sqlite_immediate  # noqa: F401\nfrom glance.wsgi.api import application  # noqa: E402,F401\n' \
        >"$ETC/glance_wsgi.py"
    run_glance "$ETC" "$G_PORT" 8 glance access.log
    wait_http "http://127.0.0.1:$G_PORT/healthcheck" 200 120
    local code
    code=$(curl -m 30 -s -o /dev/null -w '%{http_code}' -H "X-Auth-Token: $(token admin secret admin)" "http://127.0.0.1:$G_PORT/v2/images")
    [ "$code" = 200 ] || { echo "glance answered $code on /v2/images; see $LOG" >&2; tail -20 "$LOG/glance-api.log" >&2; exit 1; }

    # ---- With Ceph: the same Glance (database, stores) behind a second API that hides locations.
    if [ -n "$CEPH_ENV" ]; then
        mkdir -p "$ETC/private"
        sed -e 's/^show_image_direct_url = .*/show_image_direct_url = false/' \
            -e 's/^show_multiple_locations = .*/show_multiple_locations = false/' \
            -e "s|^log_file = .*|log_file = $LOG/glance-api-private.log|" "$ETC/glance-api.conf" >"$ETC/private/glance-api.conf"
        cp "$ETC/glance-api-paste.ini" "$ETC/private/"
        sed -i "s|^config_file = .*|config_file = $ETC/private/glance-api-paste.ini|" "$ETC/private/glance-api.conf"
        sed -i "s|--config-file $ETC/glance-api.conf|--config-file $ETC/private/glance-api.conf|" "$ETC/private/glance-api.conf"
        run_glance "$ETC/private" "$GP_PORT" 4 glance-private access-private.log
        wait_http "http://127.0.0.1:$GP_PORT/healthcheck" 200 120
        ceph_env="$ceph_env
GLANCE_PRIVATE_URL=http://127.0.0.1:$GP_PORT
GLANCE_SERVICE_USERNAME=glance
GLANCE_SERVICE_PASSWORD=glancepw
GLANCE_SERVICE_PROJECT_NAME=service"
    fi

    cat >"$BASE/env" <<EOF
KEYSTONE_URL=$K
GLANCE_URL=http://127.0.0.1:$G_PORT
OS_AUTH_URL=$K
OS_USERNAME=admin
OS_PASSWORD=secret
OS_PROJECT_NAME=admin
DEMO_USERNAME=demo
DEMO_PASSWORD=demopw
DEMO_PROJECT_NAME=demo
GLANCE_STORE_DIR=$STATE/images
GLANCE_ACCESS_LOG=$LOG/access.log
$ceph_env
$cinder_env
EOF
    echo "keystone on :$KS_PORT, glance on :$G_PORT; env in $BASE/env"
}

case "${1:-}" in
    start) start ;;
    stop) stop_one "$RUN/glance.pid" glance; stop_one "$RUN/glance-private.pid" glance-private
          stop_privsep
          CINDER_BASE=$CINDER_BASE bash "$HERE/cinder-fixture.sh" stop
          stop_one "$RUN/keystone.pid" keystone; stop_one "$RUN/web.pid" web ;;
    env) echo "$BASE/env" ;;
    token) token admin secret admin ;;
    *) echo "usage: $0 start|stop|env|token" >&2; exit 2 ;;
esac
