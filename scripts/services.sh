# Sourced by scripts/test.sh and scripts/ceph-soak.sh: starts the real services the tests use (a single-node Ceph
# cluster, then Keystone, Cinder and Glance with its rbd and cinder stores) unless they already run, in the background while the
# caller builds, and stops on exit exactly what it started.
#   services_start     start what is not running (returns at once; call services_wait before the tests)
#   services_wait      wait for the start to finish
cephenv=$(bash scripts/ceph-cluster.sh env)
envfile=$(bash scripts/openstack-fixture.sh env)
started_ceph="" started_os="" services_pid=""
ceph_up() { [ -f "$cephenv" ] && timeout 10 ceph -c "$(. "$cephenv"; echo "$CEPH_CONF")" --id admin \
    --keyring "$(. "$cephenv"; echo "$CEPH_ADMIN_KEYRING")" --connect-timeout 5 health >/dev/null 2>&1; }
glance_up() { [ -f "$envfile" ] && grep -q '^GLANCE_PRIVATE_URL=' "$envfile" && grep -q '^GLANCE_CINDER_STORES=' "$envfile" &&
    curl -sf -m 5 -o /dev/null "$(. "$envfile"; echo "$GLANCE_URL")/healthcheck"; }
services_stop() {
    [ -n "$started_os" ] && bash scripts/openstack-fixture.sh stop >/dev/null || true
    [ -n "$started_ceph" ] && bash scripts/ceph-cluster.sh stop >/dev/null || true
}
services_start() {
    trap services_stop EXIT
    ceph_up || started_ceph=1
    # A new cluster has a new fsid and no client.glance: Glance's rbd store must be set up again.
    if [ -n "$started_ceph" ] || ! glance_up; then started_os=1; fi
    [ -n "$started_ceph$started_os" ] || return 0
    # Ceph first (Glance's rbd store needs its fsid and a cephx user).
    (
        if [ -n "$started_ceph" ]; then bash scripts/ceph-cluster.sh stop >/dev/null; bash scripts/ceph-cluster.sh start >/dev/null; fi
        if [ -n "$started_os" ]; then
            bash scripts/openstack-fixture.sh stop >/dev/null
            IMGCONV_CEPH_ENV=$cephenv bash scripts/openstack-fixture.sh start
        fi
    ) &
    services_pid=$!
}
services_wait() {
    [ -z "$services_pid" ] || wait "$services_pid"
}
