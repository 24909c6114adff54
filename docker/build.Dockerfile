# Builds the .deb (dpkg-buildpackage, lintian) and the Arch package (Debian's
# makepkg and pacman 7); also boots systemd for the Arch install test.
FROM asd-base-build:trixie
# makepkg refuses to run as root.
RUN useradd --create-home --shell /bin/sh builder \
 && systemctl mask systemd-modules-load.service getty.target console-getty.service \
        systemd-firstboot.service
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
