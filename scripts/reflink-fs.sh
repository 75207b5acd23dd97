#!/usr/bin/env bash
# An XFS file system (reflink on, xfsprogs' default) on a loop device over a sparse file, for the tests and
# benchmarks of extent sharing (imgconv convert clones what a source stores verbatim, FICLONERANGE): this
# machine's / is ext4, which cannot share extents.
#   scripts/reflink-fs.sh start [size (8G)]   make and mount it (root or sudo; a no-op when mounted)
#   scripts/reflink-fs.sh stop                unmount it, detach the loop device, remove the file
#   scripts/reflink-fs.sh dir                 print the mount point
set -euo pipefail
base=${IMGCONV_REFLINK_BASE:-/tmp/imgconv-xfs}
mnt=$base/mnt
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
case "${1:-}" in
start)
    if mountpoint -q "$mnt"; then echo "$mnt"; exit 0; fi
    mkdir -p "$mnt"
    rm -f "$base/fs.img"
    truncate -s "${2:-8G}" "$base/fs.img"
    mkfs.xfs -q -f -m reflink=1 "$base/fs.img"
    $SUDO mount -o loop "$base/fs.img" "$mnt"
    $SUDO chmod 1777 "$mnt"
    echo "$mnt"
    ;;
stop)
    if mountpoint -q "$mnt"; then $SUDO umount "$mnt"; fi
    rm -f "$base/fs.img"
    ;;
dir) echo "$mnt" ;;
*) echo "usage: $0 start [size]|stop|dir" >&2; exit 2 ;;
esac
