# Builds the .deb (dpkg-buildpackage, lintian) and the Arch package (Debian's
# makepkg and pacman 7); also boots systemd for the Arch install test.
FROM asd-base-build:trixie
# makepkg refuses to run as root: a build user. `pacman -Q` as root creates
# pacman's empty local database (and exits 1, as it is empty), which makepkg
# reads for .BUILDINFO and the Arch test installs into.
RUN useradd --create-home --shell /bin/sh builder \
 && { pacman -Q >/dev/null || true; } \
 && test -e /var/lib/pacman/local/ALPM_DB_VERSION \
 && systemctl mask systemd-modules-load.service getty.target console-getty.service \
        systemd-firstboot.service
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
