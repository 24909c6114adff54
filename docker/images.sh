#!/bin/sh
# Build the container images, or reuse them when their inputs have not changed.
#
#   asd-base:trixie        debootstrap: systemd + asd's runtime dependencies
#   asd-base-build:trixie  asd-base + apt-get install of the .deb and Arch build tools
#   asd-test:trixie        test.Dockerfile FROM asd-base (install tests)
#   asd-build:trixie       build.Dockerfile FROM asd-base-build (builds, Arch test)
#
# Each image carries the label asd.inputs = a hash of everything it is made from
# (scripts, package lists, Dockerfile, parent image id). A missing or stale image
# is rebuilt; ASD_REBUILD_IMAGES=1 rebuilds all. No registry is used: the base
# images are debootstrapped from this machine's Debian mirror.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

./engine.sh

label() {
    docker image inspect -f '{{ index .Config.Labels "asd.inputs" }}' "$1" 2>/dev/null || true
}
fresh() { # TAG HASH
    [ "${ASD_REBUILD_IMAGES:-0}" != 1 ] && [ "$(label "$1")" = "$2" ]
}

base() { # TAG LIST [PARENT]
    tag=$1
    h=$( (cat mkrootfs.sh "$2"; [ -z "${3:-}" ] || docker image inspect -f '{{.Id}}' "$3") |
        sha256sum | cut -c1-16)
    if fresh "$tag" "$h"; then
        echo "images: $tag is up to date" >&2
        return
    fi
    old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
    set -- "$tag" "$2" ${3:+"$3"}
    # a mirror hiccup should not fail a CI run: one more try
    if ! mkrootfs "$@"; then
        echo "images: building $tag failed; trying once more" >&2
        sleep 10
        mkrootfs "$@"
    fi
    drop_old "$old"
}
mkrootfs() { # TAG LIST [PARENT]
    if [ -n "${3:-}" ]; then
        ASD_INPUTS_HASH=$h ./mkrootfs.sh --from "$3" "$1" "$2"
    else
        ASD_INPUTS_HASH=$h ./mkrootfs.sh "$1" "$2"
    fi
}
stale=
drop_old() { # remember the image a rebuild replaced; removed at the end (children first)
    stale="$1 $stale"
}

derived() { # TAG DOCKERFILE PARENT
    h=$( (cat "$2"; docker image inspect -f '{{.Id}}' "$3") | sha256sum | cut -c1-16)
    if fresh "$1" "$h"; then
        echo "images: $1 is up to date" >&2
        return
    fi
    echo "images: building $1" >&2
    old=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
    # --network none: the engine has no bridge, and nothing here needs the network
    DOCKER_BUILDKIT=0 docker build --quiet --force-rm --network none --label "asd.inputs=$h" \
        -t "$1" -f "$2" "$context" >/dev/null
    drop_old "$old"
}

# an empty build context: the Dockerfiles COPY nothing
context=$(mktemp -d)
trap 'rmdir "$context"' EXIT
want=${1:-all}
base asd-base:trixie packages-runtime.txt
case $want in
test | all) derived asd-test:trixie test.Dockerfile asd-base:trixie ;;
esac
case $want in
build | all)
    base asd-base-build:trixie packages-build.txt asd-base:trixie
    derived asd-build:trixie build.Dockerfile asd-base-build:trixie
    ;;
esac
for id in $stale; do
    # unless something (a container, a newer image) still uses it
    docker rmi "$id" >/dev/null 2>&1 || true
done
