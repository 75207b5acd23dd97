#!/usr/bin/env bash
# Runs the agent in the foreground against a local Keystone + Glance (scripts/openstack-fixture.sh, started if
# needed), with one sample image tagged for prefetch. Ctrl-C stops the agent. From another terminal:
#   IMGCONV_SOCKET=/tmp/imgconv-demo/agent.sock .build/release/imgconv cache list
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
envfile=$(bash scripts/openstack-fixture.sh env)
if ! { [ -f "$envfile" ] && curl -sf -m 5 -o /dev/null "$(. "$envfile"; echo "$GLANCE_URL")/healthcheck"; }; then
    bash scripts/openstack-fixture.sh start
fi
# shellcheck disable=SC1090
. "$envfile"
TOK=$(bash scripts/openstack-fixture.sh token)
ID=$(curl -sf -X POST "$GLANCE_URL/v2/images" -H "X-Auth-Token: $TOK" -H 'Content-Type: application/json' \
    -d '{"name":"imgconv-demo","disk_format":"qcow2","container_format":"bare","tags":["imgconv-demo"]}' \
    | python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
curl -sf -X PUT "$GLANCE_URL/v2/images/$ID/file" -H "X-Auth-Token: $TOK" -H 'Content-Type: application/octet-stream' \
    --data-binary @samples/qcow2-zlib.qcow2
demo=/tmp/imgconv-demo
mkdir -p "$demo"
cat >"$demo/agent.conf" <<CONF
[agent]
socket_path = $demo/agent.sock
state_dir = $demo/state
[glance]
auth_url = $KEYSTONE_URL
username = admin
password = secret
project_name = admin
[cache]
directory = $demo/cache
max_size = 1G
[prefetch]
tag = imgconv-demo
interval = 30
CONF
echo "uploaded image $ID (tag imgconv-demo); agent socket $demo/agent.sock"
# Both executables: `imgconv agent` runs imgconv-agent, installed next to it.
swift build -c release
exec "$(swift build -c release --show-bin-path)/imgconv" agent --config "$demo/agent.conf"
