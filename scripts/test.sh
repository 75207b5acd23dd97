#!/usr/bin/env bash
# The test command: unit tests of every module, the CLI tests, the qemu-img oracle suite, the agent's end-to-end
# tests against a real Keystone and Glance (scripts/openstack-fixture.sh), and the RBD and disk tests against a
# real single-node Ceph cluster (scripts/ceph-cluster.sh) with Glance's rbd store. Whatever is not already
# running is started here, in the background while the build runs, and stopped again at the end.
# IMGCONV_REQUIRE_QEMU=1 / IMGCONV_REQUIRE_OPENSTACK=1 / IMGCONV_REQUIRE_CEPH=1 make a missing oracle or service
# a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export IMGCONV_REQUIRE_QEMU=1 IMGCONV_REQUIRE_OPENSTACK=1 IMGCONV_REQUIRE_CEPH=1
cephenv=$(bash scripts/ceph-cluster.sh env)
envfile=$(bash scripts/openstack-fixture.sh env)
started_ceph="" started_os=""
ceph_up() { [ -f "$cephenv" ] && timeout 10 ceph -c "$(. "$cephenv"; echo "$CEPH_CONF")" --id admin \
    --keyring "$(. "$cephenv"; echo "$CEPH_ADMIN_KEYRING")" --connect-timeout 5 health >/dev/null 2>&1; }
glance_up() { [ -f "$envfile" ] && grep -q '^GLANCE_RBD_STORE=' "$envfile" &&
    curl -sf -m 5 -o /dev/null "$(. "$envfile"; echo "$GLANCE_URL")/healthcheck"; }
cleanup() {
    [ -n "$started_os" ] && bash scripts/openstack-fixture.sh stop >/dev/null || true
    [ -n "$started_ceph" ] && bash scripts/ceph-cluster.sh stop >/dev/null || true
}
trap cleanup EXIT
ceph_up || started_ceph=1
# A new cluster has a new fsid and no client.glance: Glance's rbd store must be set up again.
if [ -n "$started_ceph" ] || ! glance_up; then started_os=1; fi
if [ -n "$started_ceph$started_os" ]; then
    # Ceph first (Glance's rbd store needs its fsid and a cephx user), both while the build runs.
    (
        if [ -n "$started_ceph" ]; then bash scripts/ceph-cluster.sh stop >/dev/null; bash scripts/ceph-cluster.sh start >/dev/null; fi
        if [ -n "$started_os" ]; then
            bash scripts/openstack-fixture.sh stop >/dev/null
            IMGCONV_CEPH_ENV=$cephenv bash scripts/openstack-fixture.sh start
        fi
    ) &
    services=$!
fi
swift build --build-tests
if [ -n "$started_ceph$started_os" ]; then wait "$services"; fi
swift test --skip-build
