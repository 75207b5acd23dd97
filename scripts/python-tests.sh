#!/usr/bin/env bash
# The Python side's tests: the client package (clients/python) installed with pip into a venv, as an operator
# installs it, then its unittest suite against a real agent (the debug build), the Glance fixture and the Ceph
# test cluster, with every answer validated against the agent's OpenAPI document (jsonschema, test-only); first,
# that the document the agent serves is api/openapi.yaml's (scripts/openapi.py --check).
# Run by scripts/test.sh once the services are up; alone: scripts/python-tests.sh [unittest args].
set -euo pipefail
cd "$(dirname "$0")/.."
base=${IMGCONV_FIXTURE_DIR:-/tmp/imgconv-openstack}
venv=$base/venv-client
py=/usr/bin/python3
if ! "$venv/bin/python" -c 'import jsonschema, yaml, flake8' 2>/dev/null; then
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'jsonschema==4.23.0' 'PyYAML==6.0.2' 'flake8==7.1.1'
fi
# The Python side follows OpenStack's style (PEP 8, 79 columns: pycodestyle and pyflakes).
"$venv/bin/python" -m flake8 clients/python integrations scripts/openapi.py bench/nova_boot.py --extend-exclude build,*.egg-info
# The agent serves api/openapi.yaml from generated Swift: it must be what the YAML makes.
"$venv/bin/python" scripts/openapi.py --check
# Always reinstalled: the tests must run what `pip install ./clients/python` gives.
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
export IMGCONV_BINARY=${IMGCONV_BINARY:-$(swift build --show-bin-path)/imgconv}
cd clients/python/tests
exec "$venv/bin/python" -m unittest "${@:-discover}" -v
