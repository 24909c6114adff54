#!/bin/sh
# Build a Debian trixie root filesystem and `docker import` it, without a registry.
#
#   mkrootfs.sh TAG LIST                  debootstrap --variant=minbase --include=LIST
#   mkrootfs.sh --from IMAGE TAG LIST     IMAGE's filesystem + apt-get install LIST
#
# LIST is a file of package names (# comments). The second form grows an image made
# by the first instead of bootstrapping again (faster, and debootstrap's own
# dependency ordering fails on large --include sets such as lintian's perl stack).
# The mirror is the one this machine's apt sources name, read now (deb822 `URIs:`
# lines first, then sources.list); no host name is written into the repository, and
# the images keep no apt sources. Downloaded .debs stay in $ASD_IMAGE_CACHE
# (default /var/cache/asd-images) so a rebuild does not fetch them again.
set -eu

from=
if [ "$1" = --from ]; then
    from=$2
    shift 2
fi
tag=$1
list=$2
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

pkgs=$(sed 's/#.*//' "$list" | tr -s ' \t' '\n\n' | grep -v '^$' || true)

work=$(mktemp -d "${TMPDIR:-/var/tmp}/asd-rootfs.XXXXXX")
root=$work/root
mkdir "$root"
unmount_all() {
    for m in "$root/var/cache/apt/archives" "$root/proc"; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m"; fi
    done
}
cleanup() {
    unmount_all || true
    [ -n "${cid:-}" ] && docker rm "$cid" >/dev/null 2>&1
    # never delete through a mount that is still there (the .deb cache, /proc)
    if grep -q " $work/" /proc/self/mountinfo; then
        echo "mkrootfs: mounts left under $work; not removing it" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT INT TERM

if [ -z "$from" ]; then
    # debootstrap, and a keyring that knows trixie's keys (bookworm's got them in
    # a point release)
    if ! command -v debootstrap >/dev/null 2>&1 ||
        [ ! -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap debian-archive-keyring >&2 ||
            { apt-get update >&2 &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap debian-archive-keyring >&2; }
    fi
    mkdir -p "$cache/debs"
    echo "mkrootfs: debootstrap $suite from the apt sources' mirror ($tag)" >&2
    debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        --cache-dir="$cache/debs" --include="$(echo "$pkgs" | paste -sd, -)" \
        "$suite" "$root" "$mirror" >&2
else
    echo "mkrootfs: $from + apt-get install ($tag)" >&2
    cid=$(docker create --network none "$from" /bin/true)
    docker export "$cid" | tar -C "$root" --numeric-owner -x
    docker rm "$cid" >/dev/null
    cid=
    # the engine's view of these, not the image's
    rm -f "$root/.dockerenv"
    echo "deb $mirror $suite main" >"$root/etc/apt/sources.list"
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    # speed: no fsync per file (a crash only loses this scratch tree) and no
    # man-db index rebuild (nobody reads man pages in the build image)
    echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/asd-unsafe-io"
    rm -f "$root/var/lib/man-db/auto-update"
    mkdir -p "$cache/apt"
    mount --bind "$cache/apt" "$root/var/cache/apt/archives"
    mount -t proc proc "$root/proc"
    chroot "$root" apt-get update -o Acquire::Languages=none -o Acquire::Retries=3 >&2
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive chroot "$root" \
        apt-get install -y --no-install-recommends -o Acquire::Retries=3 $pkgs >&2
    unmount_all
    rm -f "$root/etc/dpkg/dpkg.cfg.d/asd-unsafe-io"
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
