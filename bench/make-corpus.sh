#!/usr/bin/env bash
# Builds the benchmark inputs in $1 (default /tmp/imgconv-bench): a cloud-image-like raw disk of realistic
# mixed content (text, ELF binaries, pseudo-random data, zero runs and holes; neither all zeros nor all random)
# and its qcow2 forms, made with qemu-img (the peer). Size in MiB: $2 (default 1024).
set -euo pipefail
dir=${1:-/tmp/imgconv-bench}
mib=${2:-1024}
mkdir -p "$dir"
cd "$dir"
if [ ! -f mixed.raw ] || [ "$(stat -c %s mixed.raw)" != $((mib << 20)) ]; then
    rm -f mixed.raw
    truncate -s "${mib}M" mixed.raw
    set +o pipefail  # `head` closes its pipe early on purpose
    off=0
    step=$((mib / 16))  # 16 regions of each kind across the disk
    bins=$(ls /usr/bin/* /usr/lib/x86_64-linux-gnu/*.so* 2>/dev/null | head -400)
    for i in $(seq 0 15); do
        base=$((i * step))
        # Binaries (about 30%): concatenated system executables and libraries.
        cat $bins 2>/dev/null | head -c $((step * 3 / 10 << 20)) | dd of=mixed.raw bs=1M seek=$base conv=notrunc status=none iflag=fullblock
        # Text (about 20%): man pages and docs, decompressed.
        (zcat /usr/share/man/man1/*.gz 2>/dev/null; cat /usr/share/doc/*/copyright 2>/dev/null) | head -c $((step * 2 / 10 << 20)) \
            | dd of=mixed.raw bs=1M seek=$((base + step * 3 / 10)) conv=notrunc status=none iflag=fullblock
        # Random (about 10%): already-compressed content.
        head -c $((step / 10 << 20)) /dev/urandom | dd of=mixed.raw bs=1M seek=$((base + step / 2)) conv=notrunc status=none iflag=fullblock
        # Explicit zeros (about 10%), written, not holes.
        head -c $((step / 10 << 20)) /dev/zero | dd of=mixed.raw bs=1M seek=$((base + step * 6 / 10)) conv=notrunc status=none iflag=fullblock
        # The rest stays a hole.
    done
    set -o pipefail
fi
[ -f mixed.qcow2 ] || qemu-img convert -f raw -O qcow2 mixed.raw mixed.qcow2
[ -f mixed-zlib.qcow2 ] || qemu-img convert -f raw -O qcow2 -c mixed.raw mixed-zlib.qcow2
if [ ! -f huge.qcow2 ]; then
    # 1 TiB virtual, 64 MiB of data spread over it.
    qemu-img create -q -f qcow2 huge.qcow2 1T
    cmds=()
    for i in $(seq 0 15); do cmds+=(-c "write -P $((i + 1)) $((i * 64))G 4M"); done
    qemu-io -f qcow2 "${cmds[@]}" huge.qcow2 >/dev/null
fi
ls -l "$dir"
