#!/bin/sh
# Capture what asd reads about block devices, as fixtures for tests/unit/test_devices*.py.
#
#   capture.sh OUTDIR NAME...     NAME is a kernel block device name: sda, nvme0n1p2, dm-0
#
# For each NAME it writes:
#   NAME.udevadm  `udevadm info --query=all --name=NAME`. Without udevadm (containers, this
#                 project's VM) the same P:/M:/U:/T:/D:/N:/E: lines are built from sysfs,
#                 which is exactly what udevadm prints when there is no udev database.
#   NAME.sysfs    `grep -H .` over the sysfs attributes asd reads (relative to the device),
#                 then one `slaves/X` line per entry of its slaves/ directory.
# and, once: mountinfo (a copy of /proc/self/mountinfo) and btrfs (one line per btrfs
# filesystem: "FSID: member member...").
set -eu
out=$1
shift
mkdir -p "$out"
attrs="dev size removable ro queue/rotational device/model device/vendor device/type
device/name loop/backing_file dm/name dm/uuid md/level partition"
for name in "$@"; do
    dir=$(readlink -f "/sys/class/block/$name")
    if command -v udevadm >/dev/null 2>&1; then
        udevadm info --query=all --name="$name" >"$out/$name.udevadm"
    else
        {
            devpath=${dir#/sys}
            echo "P: $devpath"
            echo "M: $name"
            echo "U: block"
            sed -n 's/^DEVTYPE=/T: /p' "$dir/uevent"
            echo "D: b $(cat "$dir/dev")"
            echo "N: $name"
            echo "L: 0"
            echo "E: DEVPATH=$devpath"
            sed -e 's|^DEVNAME=|DEVNAME=/dev/|' -e 's/^/E: /' "$dir/uevent"
            echo "E: SUBSYSTEM=block"
        } >"$out/$name.udevadm"
    fi
    (
        cd "$dir"
        # shellcheck disable=SC2086 # the list is meant to split
        grep -H . $attrs 2>/dev/null || true
        for s in slaves/*; do if [ -e "$s" ]; then echo "$s"; fi; done
    ) >"$out/$name.sysfs"
done
cp /proc/self/mountinfo "$out/mountinfo"
for fs in /sys/fs/btrfs/*/devices; do
    [ -d "$fs" ] || continue
    fsid=${fs%/devices}
    echo "${fsid##*/}: $(ls "$fs" | tr '\n' ' ')"
done >"$out/btrfs"
if [ ! -s "$out/btrfs" ]; then rm -f "$out/btrfs"; fi
