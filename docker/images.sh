#!/bin/sh
# Build the container images, or reuse them when their inputs have not changed.
#
#   asd-base:trixie        debootstrap: systemd + asd's runtime dependencies
#   asd-base-build:trixie  debootstrap: the above + .deb and Arch build tools
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
hash_of() {
    cat "$@" | sha256sum | cut -c1-16
}
fresh() { # TAG HASH
    [ "${ASD_REBUILD_IMAGES:-0}" != 1 ] && [ "$(label "$1")" = "$2" ]
}

base() { # TAG LIST...
    tag=$1
    shift
    h=$(hash_of mkrootfs.sh "$@")
    if fresh "$tag" "$h"; then
        echo "images: $tag is up to date" >&2
        return
    fi
    ASD_INPUTS_HASH=$h ./mkrootfs.sh "$tag" "$@"
}

derived() { # TAG DOCKERFILE PARENT
    h=$( (cat "$2"; docker image inspect -f '{{.Id}}' "$3") | sha256sum | cut -c1-16)
    if fresh "$1" "$h"; then
        echo "images: $1 is up to date" >&2
        return
    fi
    echo "images: building $1" >&2
    # --network none: the engine has no bridge, and nothing here needs the network
    DOCKER_BUILDKIT=0 docker build --quiet --network none --label "asd.inputs=$h" \
        -t "$1" -f "$2" "$here/context" >/dev/null
}

mkdir -p context  # an empty build context: the Dockerfiles COPY nothing
want=${1:-all}
case $want in
test | all)
    base asd-base:trixie packages-runtime.txt
    derived asd-test:trixie test.Dockerfile asd-base:trixie
    ;;
esac
case $want in
build | all)
    base asd-base-build:trixie packages-runtime.txt packages-build.txt
    derived asd-build:trixie build.Dockerfile asd-base-build:trixie
    ;;
esac
