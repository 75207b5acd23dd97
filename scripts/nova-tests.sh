#!/usr/bin/env bash
# Nova's own code as the consumer's oracle: nova==34.0.0 from PyPI in a venv (system site packages, for the
# rados/rbd bindings Nova's RBDDriver uses), integrations/nova/nova-34.0.0-imgconv.patch applied to it (the run
# fails if the patch does not apply to the installed Nova), the client package installed with pip, then
# Nova's own unit tests for the image backend, libvirt utils and the image cache (its test requirements from
# PyPI), then integrations/nova/tests against a real agent, the Glance fixture and the Ceph test cluster.
# Run by scripts/test.sh once the services are up; alone: scripts/nova-tests.sh [unittest args].
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
base=${IMGCONV_FIXTURE_DIR:-/tmp/imgconv-openstack}
venv=$base/venv-nova
patch_file=$repo/integrations/nova/nova-34.0.0-imgconv.patch
if ! "$venv/bin/python" -c 'import nova, oslotest, wsgi_intercept' 2>/dev/null; then
    echo "installing nova 34.0.0 into $venv (pinned by scripts/openstack-constraints.txt)"
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -c scripts/openstack-constraints.txt \
        nova==34.0.0 oslotest fixtures testtools ddt wsgi-intercept requests-mock testscenarios testresources \
        osprofiler python-barbicanclient gabbi
fi
site=$("$venv/bin/python" -c 'import nova, os; print(os.path.dirname(os.path.dirname(nova.__file__)))')
[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("nova"))')" = 34.0.0 ] ||
    { echo "the venv's nova is not 34.0.0" >&2; exit 1; }
# Applied once per venv; a patch that neither applies nor is already applied is an error.
if patch -p1 -d "$site" --dry-run -R -s -f <"$patch_file" >/dev/null 2>&1; then
    echo "the imgconv patch is applied to $site/nova"
elif patch -p1 -d "$site" --dry-run -s -f <"$patch_file"; then
    patch -p1 -d "$site" -s -f <"$patch_file"
    echo "applied the imgconv patch to $site/nova"
else
    echo "integrations/nova/nova-34.0.0-imgconv.patch does not apply to the installed nova" >&2
    exit 1
fi
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
export IMGCONV_BINARY=${IMGCONV_BINARY:-$(swift build --show-bin-path)/imgconv}
# Nova's own unit tests of what the patch touches (the image backends, libvirt utils, the image cache), with
# the patch applied: it must change nothing for the other images_types.
if [ $# -eq 0 ]; then
    log=$base/log/nova-unit-tests.log
    mkdir -p "$base/log"
    if ! (cd /tmp && "$venv/bin/python" -m unittest nova.tests.unit.virt.libvirt.test_imagebackend \
            nova.tests.unit.virt.libvirt.test_utils nova.tests.unit.virt.libvirt.test_imagecache >"$log" 2>&1); then
        tail -40 "$log" >&2
        echo "Nova's own unit tests failed with the patch applied (the whole output: $log)" >&2
        exit 1
    fi
    echo "Nova's own unit tests with the patch applied: $(grep -E '^Ran ' "$log") $(tail -1 "$log")"
fi
cd integrations/nova/tests
exec "$venv/bin/python" -m unittest "${@:-discover}" -v
