#!/bin/sh
# Inside asd-build:trixie: build the Arch package with Debian's makepkg from
# packaging/arch/PKGBUILD and /out/src/anything-sync-daemon-VERSION.tar.gz, into
# /out/arch.
#
#   build-arch.sh VERSION
#
# What differs from a build on Arch, and why:
#  - makepkg --nodeps: pacman's database here knows no Arch packages, so the
#    depends/makedepends/checkdepends cannot be checked; Debian's python3,
#    python3-build, -installer, -wheel, -pytest stand in for them.
#  - DEB_PYTHON_INSTALL_LAYOUT=deb_system: Debian's python3 would otherwise have
#    `python -m installer` put the code under /usr/local; with it the package
#    holds /usr/bin/asd and /usr/lib/python3/dist-packages/asd, where this
#    Debian-based test system's python3 looks. On Arch the same PKGBUILD gives
#    /usr/lib/python3.X/site-packages.
#  - PKGEXT=.pkg.tar.zst: Arch's default; Debian's makepkg.conf says .pkg.tar.gz.
set -eu
version=$1
name=anything-sync-daemon
tarball=/out/src/$name-$version.tar.gz
work=/home/builder/arch

rm -rf "$work" && mkdir -p "$work"
cp "$tarball" "$work/"
tar -xzf "$tarball" -C "$work" --strip-components=3 \
    "$name-$version/packaging/arch/PKGBUILD" "$name-$version/packaging/arch/asd.install"
sum=$(sha256sum "$tarball" | cut -d' ' -f1)
sed -i -e "s/^pkgver=.*/pkgver=$version/" -e "s/^sha256sums=.*/sha256sums=('$sum')/" "$work/PKGBUILD"
chown -R builder: "$work"

cd "$work"
runuser -u builder -- env DEB_PYTHON_INSTALL_LAYOUT=deb_system PKGDEST="$work" PKGEXT=.pkg.tar.zst \
    makepkg --nodeps --noconfirm --cleanbuild

rm -rf /out/arch && mkdir -p /out/arch
cp "$work"/*.pkg.tar.* "$work/PKGBUILD" "$work/asd.install" "$work/$name-$version.tar.gz" /out/arch/
echo "build-arch: $(ls /out/arch/*.pkg.tar.*)" >&2
