#!/bin/sh
# Build a Debian trixie root filesystem with debootstrap and `docker import` it.
#
#   mkrootfs.sh TAG PACKAGE_LIST [EXTRA_LIST...]
#
# The first list goes to debootstrap --variant=minbase --include; the packages of
# the others are then installed with apt-get inside the new root (debootstrap's own
# dependency ordering fails on large --include sets, e.g. lintian's perl stack).
# The mirror is the one this machine's apt sources name, read now (deb822 `URIs:`
# lines first, then sources.list); no host name is written into the repository.
# Downloaded .debs are kept in $ASD_IMAGE_CACHE so a rebuild does not fetch again.
set -eu

tag=$1
shift
cache=${ASD_IMAGE_CACHE:-/var/cache/asd-images}
suite=trixie

mirror=${ASD_MIRROR:-}
if [ -z "$mirror" ]; then
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # the first URIs: of a stanza that is not a security archive
        mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$mirror" ] && break
    done
fi
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
    echo "mkrootfs: no Debian mirror found in /etc/apt/sources.list{,.d}; set ASD_MIRROR" >&2
    exit 1
fi

words() { sed 's/#.*//' "$@" | tr -s ' \t' '\n\n' | grep -v '^$' || true; }
pkgs=$(words "$1" | paste -sd, -)
shift
extra=$(words "$@")

command -v debootstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap debian-archive-keyring >&2
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

mkdir -p "$cache/debs"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/asd-rootfs.XXXXXX")
root=$work/root
unmount_all() {
    for m in "$root/var/cache/apt/archives" "$root/proc"; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m"; fi
    done
}
cleanup() {
    unmount_all || true
    # never delete through a mount that is still there (the .deb cache, /proc)
    if grep -q " $work/" /proc/self/mountinfo; then
        echo "mkrootfs: mounts left under $work; not removing it" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT INT TERM

echo "mkrootfs: debootstrap $suite ($tag)" >&2
debootstrap --variant=minbase --keyring="$keyring" --cache-dir="$cache/debs" \
    --include="$pkgs" "$suite" "$root" "$mirror" >&2

if [ -n "$extra" ]; then
    echo "mkrootfs: apt-get install" $extra >&2
    mkdir -p "$cache/apt"
    mount --bind "$cache/apt" "$root/var/cache/apt/archives"
    mount -t proc proc "$root/proc"
    chroot "$root" apt-get update >&2
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y --no-install-recommends $extra >&2
    unmount_all
fi

# An image with no network has no use for the mirror; a local repository is added
# by the Dockerfiles that need one.
rm -f "$root"/etc/apt/sources.list "$root"/etc/apt/sources.list.d/*
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
# a container's hostname and machine id come from the engine / first boot
: >"$root/etc/machine-id"

echo "mkrootfs: importing $tag" >&2
tar -C "$root" --numeric-owner -c . | docker import \
    --change 'CMD ["/sbin/init"]' \
    --change "LABEL asd.inputs=${ASD_INPUTS_HASH:-none}" \
    - "$tag" >/dev/null
