#!/usr/bin/env bash
# The test command: unit tests of every module, the CLI tests, the qemu-img oracle suite, the agent's end-to-end
# tests against a real Keystone and Glance (scripts/openstack-fixture.sh), and the RBD and disk tests against a
# real single-node Ceph cluster (scripts/ceph-cluster.sh) with Glance's rbd store. Whatever is not already
# running is started here, in the background while the build runs, and stopped again at the end.
# IMGCONV_REQUIRE_QEMU=1 / IMGCONV_REQUIRE_OPENSTACK=1 / IMGCONV_REQUIRE_CEPH=1 / IMGCONV_REQUIRE_REFLINK=1 make a
# missing oracle, service or file system a failure, not a skip (the last is set once the XFS file system is up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export IMGCONV_REQUIRE_QEMU=1 IMGCONV_REQUIRE_OPENSTACK=1 IMGCONV_REQUIRE_CEPH=1
. scripts/services.sh
services_start
# An XFS file system on a loop device, for the extent-sharing tests (this machine's / is ext4); stopped on exit
# if this script mounted it. Where loop mounts are not allowed (a container without CAP_SYS_ADMIN) the error is
# printed and those tests are skipped, saying why.
if mountpoint -q "$(bash scripts/reflink-fs.sh dir)"; then reflink_started=""; else reflink_started=1; fi
if IMGCONV_REFLINK_DIR=$(bash scripts/reflink-fs.sh start 4G); then
    export IMGCONV_REFLINK_DIR IMGCONV_REQUIRE_REFLINK=1
else
    echo "test.sh: no XFS file system for the extent-sharing tests (above: why); they are skipped" >&2
fi
trap '[ -z "$reflink_started" ] || bash scripts/reflink-fs.sh stop || true; services_stop' EXIT
swift build --build-tests
services_wait
# Tests that time the agent (health under load, a connection flood, SIGTERM, the shared bandwidth limit, whose
# sleeps woke a minute late while other suites held the test process's cooperative threads) and tests that load the machine
# (forged 4 GiB images, a 2 GiB conversion) run one at a time after the rest: Swift Testing runs suites in
# parallel, and on two cores the heavy ones would be in what the timed ones (and the Ceph tests' own time
# limits) measure. The multi-store tests run there too: Glance's import tasks (copy-image, location import)
# write to its sqlite in the background and fail with "database is locked" when other suites write at the same
# time.
serial='BandwidthLimitTests|prefetchesShareOneBandwidthLimit|CinderStoreTests|AgentLoadTests|aFleetOfAgentsMakesOneBaseFromOneGlanceRead|twoThousandConnectionsFromARefusedUIDDoNotDelayOthers|HostileImageTests|shutdownStopsAForceRawConversion|GlanceStoreTests|StoreCopyTests'
swift test --skip-build --skip "$serial"
swift test --skip-build --no-parallel --filter "$serial"
# The Python client (clients/python) against a real agent, and the agent's answers against api/openapi.yaml.
bash scripts/python-tests.sh
# Nova 34.0.0's own code with the imgconv patch: its unit tests, and its root-disk path against the agent.
bash scripts/nova-tests.sh
