#!/usr/bin/env bash
# Installs what imgconv needs to build and test on Debian 12: zlib, zstd, libdeflate, sqlite and OpenSSL headers (build),
# qemu-utils (qemu-img and qemu-io: the test oracle and benchmark peer only; imgconv never runs them), and for the
# Keystone/Glance test fixture python3-venv and curl. Ceph: librados/librbd headers (build), and for the test
# cluster (scripts/ceph-cluster.sh) the mon, mgr and OSD daemons, the RADOS Gateway (radosgw: the S3 server behind
# Glance's s3 store), the ceph/rbd CLIs, and the Python bindings Glance's rbd store uses.
# RabbitMQ for the Cinder fixture (scripts/cinder-fixture.sh): its RPC bus; nothing starts it but that script.
# xfsprogs for the XFS file system the extent-sharing tests convert on (scripts/reflink-fs.sh), e2fsprogs for filefrag.
# Needs root or sudo. Skips apt entirely when everything is already there.
set -euo pipefail
packages=(zlib1g-dev libzstd-dev libdeflate-dev libsqlite3-dev libssl-dev qemu-utils python3-venv curl
    librbd-dev librados-dev ceph-mon ceph-mgr ceph-osd ceph-common radosgw python3-rados python3-rbd rabbitmq-server
    xfsprogs e2fsprogs)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
