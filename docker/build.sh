#!/bin/sh
# Build asd's packages in the asd-build:trixie container; results go to $ASD_OUT
# (default: out/ at the top of the tree).
#
#   build.sh srctar            out/src/anything-sync-daemon-VERSION.tar.gz
#   build.sh deb               out/deb/        .deb + .changes, lintian-clean, apt repo
#   build.sh deb-upgrade       out/deb-upgrade/ the same source as VERSION-1+upgrade1,
#                              (nocheck, no lintian: a fixture for the upgrade test)
#   build.sh arch              out/arch/       PKGBUILD, source tarball, .pkg.tar.zst
#
# The source tarball holds the files git knows about plus untracked, not ignored
# ones, so a build sees work in progress but never .venv/, out/ or caches.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
out=${ASD_OUT:-$top/out}
name=anything-sync-daemon
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/asd/__init__.py")
[ -n "$version" ] || { echo "build: no __version__ in asd/__init__.py" >&2; exit 1; }

srctar() {
    # file times: the last commit's, so the tarball is reproducible and no file
    # looks decades old to lintian (package-contains-ancient-file)
    stamp=$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)
    mkdir -p "$out/src"
    tmp=$(mktemp -d)
    (cd "$top" && git ls-files -z --cached --others --exclude-standard) |
        (cd "$top" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
        tar -C "$top" --null -T - --transform "s,^,$name-$version/," \
            --owner=0 --group=0 --numeric-owner --mtime=@$stamp --sort=name -czf "$tmp/src.tar.gz"
    mv "$tmp/src.tar.gz" "$out/src/$name-$version.tar.gz"
    rmdir "$tmp"
}

in_build() { # run a command in a throw-away build container
    "$here/images.sh" build
    docker run --rm --network none -e DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-}" \
        -e ASD_NO_LINTIAN="${ASD_NO_LINTIAN:-}" \
        -v "$here:/docker:ro" -v "$out:/out" asd-build:trixie "$@"
}

case ${1:-} in
srctar) srctar ;;
deb)
    srctar
    in_build /docker/build-deb.sh "$version" deb
    ;;
deb-upgrade)
    srctar
    DEB_BUILD_OPTIONS=nocheck ASD_NO_LINTIAN=1 in_build /docker/build-deb.sh "$version" deb-upgrade 1+upgrade1
    ;;
arch)
    srctar
    in_build /docker/build-arch.sh "$version"
    ;;
*)
    echo "usage: build.sh srctar|deb|deb-upgrade|arch" >&2
    exit 2
    ;;
esac
