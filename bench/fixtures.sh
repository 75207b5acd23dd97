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
