#!/bin/bash
# Re-create the vm/ fixtures: run as root on a machine with loop devices, btrfs-progs and
# e2fsprogs (zram optional). Everything is mounted inside a private mount namespace and torn
# down at the end; the loop and zram devices it sets up are released.
#
#   unshare -m --propagation private bash tests/data/devices/capture-vm.sh OUTDIR
set -euo pipefail
out=$(readlink -f "$1")
here=$(dirname "$(readlink -f "$0")")
work=/var/tmp/asd-capture
loops=()
zram=""
cleanup() {
    for m in overlay bind zram btrfs ext4 tmpfs; do umount "$work/mnt/$m" 2>/dev/null || true; done
    for l in "${loops[@]}"; do losetup -d "$l" || true; done
    if [ -n "$zram" ]; then echo "${zram#zram}" >/sys/class/zram-control/hot_remove || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/mnt/{ext4,btrfs,zram,tmpfs,bind,overlay}
truncate -s 64M "$work/ext4.img"
truncate -s 256M "$work/btrfs-a.img" "$work/btrfs-b.img"
mkfs.ext4 -q -F "$work/ext4.img"
loops+=("$(losetup -f --show "$work/ext4.img")")
loops+=("$(losetup -f --show "$work/btrfs-a.img")")
loops+=("$(losetup -f --show "$work/btrfs-b.img")")
mkfs.btrfs -q -f -d raid1 -m raid1 "${loops[1]}" "${loops[2]}"
mount "${loops[0]}" "$work/mnt/ext4"
mount "${loops[1]}" "$work/mnt/btrfs"
mount -t tmpfs -o size=16m asd-capture "$work/mnt/tmpfs"
mkdir -p "$work/mnt/ext4/sub" "$work/mnt/ext4/lower" "$work/mnt/tmpfs/upper" "$work/mnt/tmpfs/work"
mount --bind "$work/mnt/ext4/sub" "$work/mnt/bind"
mount -t overlay -o "lowerdir=$work/mnt/ext4/lower,upperdir=$work/mnt/tmpfs/upper,workdir=$work/mnt/tmpfs/work" \
    asd-capture "$work/mnt/overlay"
names=(vda)
if [ -w /sys/class/zram-control/hot_add ]; then
    zram=zram$(cat /sys/class/zram-control/hot_add)
    echo 64M >"/sys/block/$zram/disksize"
    mkfs.ext4 -q -F "/dev/$zram"
    mount "/dev/$zram" "$work/mnt/zram"
    names+=("$zram")
fi
for l in "${loops[@]}"; do names+=("${l#/dev/}"); done
sh "$here/capture.sh" "$out" "${names[@]}"
