#!/usr/bin/env bash
# The test command: unit tests of every module, the CLI tests, the qemu-img oracle suite, and the agent's
# end-to-end tests against a real Keystone and Glance (scripts/openstack-fixture.sh, started here if it is not
# already running, and stopped again at the end).
# IMGCONV_REQUIRE_QEMU=1 / IMGCONV_REQUIRE_OPENSTACK=1 make a missing oracle or fixture a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export IMGCONV_REQUIRE_QEMU=1 IMGCONV_REQUIRE_OPENSTACK=1
envfile=$(bash scripts/openstack-fixture.sh env)
started=""
if ! { [ -f "$envfile" ] && curl -sf -m 5 -o /dev/null "$(. "$envfile"; echo "$GLANCE_URL")/healthcheck"; }; then
    bash scripts/openstack-fixture.sh start &
    fixture=$!
    started=1
fi
trap '[ -n "$started" ] && bash scripts/openstack-fixture.sh stop >/dev/null' EXIT
swift build --build-tests
if [ -n "$started" ]; then wait "$fixture"; fi
swift test --skip-build
