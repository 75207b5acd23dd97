#!/usr/bin/env bash
# Makes the small seed images in fuzz/seeds/ (a few KiB each, so the fuzzers run thousands of inputs a second)
# with qemu-img and qemu-io. The committed samples/ are seeds too, but large.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf seeds && mkdir seeds && cd seeds
w() { qemu-io -f "$1" -c "write -P 0x5a 0 1k" -c "write -P 0x33 20k 3k" "$2" >/dev/null; }
qemu-img create -q -f qcow2 -o cluster_size=512 q-512.qcow2 64k && w qcow2 q-512.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 q-v2.qcow2 64k && w qcow2 q-v2.qcow2
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on q-extl2.qcow2 64k && w qcow2 q-extl2.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw -u q-backing.qcow2 64k
head -c 24576 /dev/zero | tr '\0' 'a' > r.raw
qemu-img convert -f raw -O qcow2 -c -o cluster_size=512 r.raw q-zlib.qcow2
qemu-img convert -f raw -O qcow2 -c -o cluster_size=512,compression_type=zstd r.raw q-zstd.qcow2
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized r.raw v-stream.vmdk
qemu-img create -q -f vmdk v-sparse.vmdk 64k && w vmdk v-sparse.vmdk
qemu-img create -q -f vmdk -o subformat=monolithicFlat v-flat.vmdk 64k && rm -f v-flat-flat.vmdk
qemu-img create -q -f vpc -o force_size=on p-dyn.vhd 64k && w vpc p-dyn.vhd
qemu-img create -q -f vpc -o subformat=fixed,force_size=on p-fixed.vhd 32k && w vpc p-fixed.vhd
qemu-img create -q -f vdi d-dyn.vdi 64k && w vdi d-dyn.vdi
rm -f r.raw
ls -l
