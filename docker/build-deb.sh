#!/bin/sh
# Inside asd-build:trixie: build the Debian source and binary packages from
# /out/src/anything-sync-daemon-VERSION.tar.gz, lint them, and publish them as a
# flat apt repository in /out/DEST (default deb).
#
#   build-deb.sh VERSION [DEST [DEBIAN_REVISION]]
#
# DEBIAN_REVISION (default: the one in debian/changelog) lets the container tests
# build a newer package (e.g. 1+upgrade1) for the upgrade test.
set -eu
version=$1
dest=/out/${2:-deb}
revision=${3:-}
name=anything-sync-daemon

rm -rf /build && mkdir /build && cd /build
cp "/out/src/$name-$version.tar.gz" "${name}_$version.orig.tar.gz"
tar xzf "${name}_$version.orig.tar.gz"
cd "$name-$version"
cp -r packaging/deb/debian debian

top=$(dpkg-parsechangelog -S Version)
want=$version-${revision:-${top#*-}}
if [ "$top" != "$want" ]; then
    # asd/__init__.py (or the caller) asks for another version than the
    # changelog's top entry: add an entry rather than build a lie.
    {
        echo "$name ($want) unstable; urgency=medium"
        echo
        echo "  * Build of $version from the source tree."
        echo
        echo " -- $(dpkg-parsechangelog -S Maintainer)  $(date -R)"
        echo
        cat debian/changelog
    } >debian/changelog.new
    mv debian/changelog.new debian/changelog
fi

dpkg-buildpackage -us -uc
cd ..
if [ -z "${ASD_NO_LINTIAN:-}" ]; then
    lintian --fail-on error,warning --info --display-info "${name}_${want}"_*.changes
fi
rm -rf "$dest" && mkdir -p "$dest"
cp ./*.deb ./*.changes ./*.dsc ./*.tar.* ./*.buildinfo "$dest"/
cd "$dest"
apt-ftparchive packages . >Packages
apt-ftparchive release . >Release
echo "build-deb: $dest/$(ls ./*.deb)" >&2
