#!/usr/bin/env bash
# Makes the small sample images in samples/ from one patterned 2 MiB + 512 B base disk, with qemu-img and
# qemu-io (Debian qemu-utils). Run it from anywhere; it rewrites the samples in place. The unit tests compare
# every sample with base.raw, so they need no qemu-img at test time.
set -euo pipefail
cd "$(dirname "$0")"
rm -f ./*.qcow2 ./*.vmdk ./*.vhd ./*.vdi ./*.raw

# The base: patterned data, text, pseudo-random bytes, an allocated zero run, unaligned sectors and holes.
python3 - <<'PY'
import os
size = 2 * 1024 * 1024 + 512
with open("base.raw", "wb") as f:
    f.truncate(size)
    def put(off, data):
        f.seek(off); f.write(data)
    put(0, bytes((i * 7 % 251 + 1) for i in range(65536)))
    put(0x30000, b"imgconv sample: the quick brown fox jumps over the lazy dog\n" * 60)
    x = 0x9E3779B97F4A7C15
    out = bytearray()
    for _ in range(131072):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF; x ^= x >> 7; x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out.append(x & 0xFF)
    put(0x100000, bytes(out))
    put(0x140000, bytes(65536))                 # allocated zeros
    put(0x180200, b"\x5a" * 512)               # one unaligned sector
    put(1536 * 1024, b"\x41" * 4096)            # a 4 KiB write inside a cluster
    put(64 * 1024, bytes(65536))                 # zeros over the pattern's second cluster
    put(size - 512, b"\xcd" * 512)             # the odd last sector
PY

conv() { qemu-img convert -f raw -O "$@"; }
conv qcow2 -o compat=0.10 base.raw qcow2-v2.qcow2
conv qcow2 base.raw qcow2-v3.qcow2
conv qcow2 -o cluster_size=512 base.raw qcow2-512.qcow2
conv qcow2 -c base.raw qcow2-zlib.qcow2
conv qcow2 -c -o compression_type=zstd base.raw qcow2-zstd.qcow2
conv qcow2 -o extended_l2=on base.raw qcow2-extl2.qcow2
# Zero subclusters inside allocated clusters, and a rewrite of one subcluster.
qemu-io -f qcow2 -c "write -z 1540k 8k" -c "write -P 0x41 1536k 4k" qcow2-extl2.qcow2 >/dev/null
conv qcow2 base.raw qcow2-zero-clusters.qcow2
qemu-io -f qcow2 -c "write -z 1792k 128k" qcow2-zero-clusters.qcow2 >/dev/null
# An internal snapshot taken before the first 4 KiB were overwritten with 0x99.
conv qcow2 base.raw qcow2-snapshot.qcow2
qemu-img snapshot -c before-update qcow2-snapshot.qcow2
qemu-io -f qcow2 -c "write -P 0x99 0 4k" qcow2-snapshot.qcow2 >/dev/null
conv vmdk base.raw vmdk-monolithic-sparse.vmdk
conv vmdk -o subformat=streamOptimized base.raw vmdk-stream-optimized.vmdk
conv vmdk -o subformat=monolithicFlat base.raw vmdk-monolithic-flat.vmdk
conv vpc base.raw vpc-dynamic.vhd
conv vpc -o subformat=fixed,force_size=on base.raw vpc-fixed.vhd
conv vdi base.raw vdi-dynamic.vdi
conv vdi -o static=on base.raw vdi-static.vdi
# qcow2-zero-clusters reads as base.raw with zeros at 1792k..1920k; qcow2-extl2 with zeros at 1540k..1548k.
