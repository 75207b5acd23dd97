#!/usr/bin/env bash
# Why a process must shut its librados clients down before exit(): a C program connects (as the test cluster's
# agent user), then calls exit() with the client still open, N times. exit() runs libceph-common's static
# destructors while the client's threads (msgr-worker, io_context_pool, ceph_timer) still run: most runs die
# with SIGSEGV or SIGABRT. The same program calling rados_shutdown() first never does. imgconv shuts every
# client down before it exits, and ends with _exit (no destructors) if one is still open (RBD/Cluster.swift,
# LiveClients). Needs a running test cluster (scripts/ceph-cluster.sh start) and gcc.
#   bash scripts/librados-exit.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-40}
. "$(bash scripts/ceph-cluster.sh env)"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/exit.c" <<'C'
#include <rados/librados.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    rados_t cluster;
    rados_ioctx_t io;
    if (rados_create(&cluster, argv[1]) < 0 || rados_conf_read_file(cluster, argv[2]) < 0 ||
        rados_conf_set(cluster, "keyring", argv[3]) < 0 || rados_connect(cluster) < 0) { fprintf(stderr, "connect failed\n"); return 2; }
    rados_ioctx_create(cluster, "vms", &io);
    if (atoi(argv[4])) { rados_ioctx_destroy(io); rados_shutdown(cluster); }
    exit(0);
}
C
gcc -O1 -o "$dir/exit" "$dir/exit.c" -lrados
for shutdown in 0 1; do
    bad=0
    for _ in $(seq 1 "$runs"); do
        "$dir/exit" "$CEPH_USER" "$CEPH_CONF" "$CEPH_USER_KEYRING" "$shutdown" 2>/dev/null || bad=$((bad + 1))
    done
    [ "$shutdown" = 1 ] && what="rados_shutdown() then exit()" || what="exit() with the client open"
    echo "$what: $bad of $runs runs crashed"
done
