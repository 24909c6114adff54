# A clean trixie system booting systemd, with asd's runtime dependencies but not
# asd: the tests install it with apt from the local repository at /srv/out/deb
# (out/deb, with out/ mounted read-only at /srv/out), the way a user would.
FROM asd-base:trixie
# Nothing in a container loads kernel modules or sets up ttys; masking these keeps
# `systemctl is-system-running` an honest "running" (any failure is ours).
RUN systemctl mask systemd-modules-load.service getty.target console-getty.service \
        systemd-firstboot.service systemd-networkd-wait-online.service \
 && printf 'Types: deb\nURIs: file:/srv/out/deb\nSuites: ./\nTrusted: yes\n' \
        >/etc/apt/sources.list.d/asd-local.sources
# systemd shuts down cleanly on SIGRTMIN+3 (`docker stop`).
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
