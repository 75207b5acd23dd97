# Sourced by the benchmarks on the real Ceph cluster (bench/disks.sh, bench/stores.sh).
#   bench_fixtures KEY   start the test cluster and the Glance fixture on it unless they run (KEY: a line the
#                        Glance fixture's env must have, e.g. GLANCE_S3_STORE), load both env files, build the
#                        release binary: sets IMGCONV, RBD (admin rbd CLI) and TOK (an admin token)
#   bench_remove_disks   remove instance disks, Nova-path images (bench-nova-*) and shared bases from vms
bench_fixtures() {
    local cephenv envfile
    cephenv=$(bash scripts/ceph-cluster.sh env)
    envfile=$(bash scripts/openstack-fixture.sh env)
    if ! [ -f "$cephenv" ]; then bash scripts/ceph-cluster.sh start >/dev/null; fi
    if ! grep -q "^$1=" "$envfile" 2>/dev/null || ! curl -sf -m 5 -o /dev/null "$(. "$envfile"; echo "$GLANCE_URL")/healthcheck"; then
        bash scripts/openstack-fixture.sh stop >/dev/null
        IMGCONV_CEPH_ENV=$cephenv bash scripts/openstack-fixture.sh start >/dev/null
    fi
    # shellcheck disable=SC1090
    . "$envfile"
    # shellcheck disable=SC1090
    . "$cephenv"
    swift build -c release --product imgconv >/dev/null && swift build -c release --product imgconv-agent >/dev/null
    IMGCONV=$(swift build -c release --show-bin-path)/imgconv
    RBD=(rbd -c "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING")
    TOK=$(bash scripts/openstack-fixture.sh token)
}

bench_remove_disks() {
    local d
    for d in $("${RBD[@]}" ls vms | grep -E '_disk$|^bench-nova-' || true); do "${RBD[@]}" rm --no-progress "vms/$d" >/dev/null 2>&1 || true; done
    for d in $("${RBD[@]}" ls vms | grep '^imgconv-base-' || true); do
        "${RBD[@]}" snap unprotect "vms/$d@imgconv" >/dev/null 2>&1 || true
        "${RBD[@]}" snap purge --no-progress "vms/$d" >/dev/null 2>&1 || true
        "${RBD[@]}" rm --no-progress "vms/$d" >/dev/null 2>&1 || true
    done
}

# bench_agent_conf DIR MAX_SIZE [AGENT_LINE...]: writes DIR/agent.conf for one agent (socket, state and cache
# under DIR) on the fixtures' Keystone, Glance and Ceph, base GC off; extra lines go into [agent].
bench_agent_conf() {
    local d=$1 max=$2 line
    shift 2
    {
        echo "[agent]"
        echo "socket_path = $d/agent.sock"
        echo "state_dir = $d/state"
        for line in "$@"; do echo "$line"; done
        cat <<CONF
[glance]
auth_url = $KEYSTONE_URL
username = admin
password = secret
project_name = admin
[cache]
directory = $d/cache
max_size = $max
[rbd]
ceph_conf = $CEPH_CONF
user = $CEPH_USER
keyring = $CEPH_USER_KEYRING
[disks]
gc_interval = 0
CONF
    } >"$d/agent.conf"
}

# bench_upload FILE DISK_FORMAT [STORE] [NAME]: creates and uploads a Glance image; prints its id.
bench_upload() {
    local id
    id=$(curl -sf -X POST "$GLANCE_URL/v2/images" -H "X-Auth-Token: $TOK" -H 'Content-Type: application/json' \
        -d "{\"name\":\"${4:-bench}\",\"disk_format\":\"$2\",\"container_format\":\"bare\"}" |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
    curl -sf -X PUT "$GLANCE_URL/v2/images/$id/file" -H "X-Auth-Token: $TOK" -H 'Content-Type: application/octet-stream' \
        ${3:+-H "X-Image-Meta-Store: $3"} -T "$1" >/dev/null
    echo "$id"
}
