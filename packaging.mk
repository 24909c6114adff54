# System integration targets, included by the top-level Makefile:
#
#   include packaging.mk
#
# images          build (or reuse) the trixie container images        docker/images.sh
# deb             out/deb/: .deb, .changes, lintian-clean, an apt repo  docker/build.sh deb
# arch            out/arch/: the Arch package, built with makepkg      docker/build.sh arch
# test-container  the container tier (pytest -m container tests/container)
# install         install from source into $(DESTDIR)$(PREFIX)
#
# Every target installs what it needs with apt-get; the container targets start a
# Docker engine (Debian's docker.io, dockerd --bridge=none) when none answers.

# the system python, which the apt-installed python3-sh/-pyudev serve (not a
# pyenv or venv python that happens to come first in PATH)
PYTHON3 ?= /usr/bin/python3
VENV_PYTHON ?= .venv/bin/python
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
# systemd looks for units and generators under /usr/local/lib too
SYSTEMD_UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSTEMD_GENERATORDIR ?= $(PREFIX)/lib/systemd/system-generators
ASD_LIBDIR ?= $(PREFIX)/lib/asd
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
# apt-get install, with a fresh package list if the first try fails
apt_install = DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1) \
	|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1); }
ASD_UNITS = asd.service asd-resync.service asd-resync.timer asd-sleep.service

.PHONY: images deb arch test-container install

images:
	docker/images.sh all

deb:
	docker/build.sh deb

arch:
	docker/build.sh arch

# engine.sh also provides the compose command pytest-docker drives (the v2 plugin
# or Debian's docker-compose). The tests build out/deb-upgrade themselves.
test-container: deb arch
	docker/engine.sh
	ASD_PACKAGES_BUILT=1 $(VENV_PYTHON) -m pytest -m container tests/container

install:
	$(call apt_install,python3-build python3-installer python3-wheel python3-setuptools)
	@if [ -z "$(DESTDIR)" ]; then \
		$(call apt_install,python3-sh python3-pyudev rsync zstd tar util-linux); fi
	rm -rf build/install-wheel build/install-root
	$(PYTHON3) -m build --wheel --no-isolation --outdir build/install-wheel .
	@# Debian's python adds /local itself (scheme posix_local) and only looks in
	@# dist-packages: no --prefix for /usr/local, its deb_system layout for /usr
	if $(PYTHON3) -c 'import sys, sysconfig; sys.exit("posix_local" not in sysconfig.get_scheme_names())'; then \
		case "$(PREFIX)" in \
		/usr/local) set -- ;; \
		/usr) export DEB_PYTHON_INSTALL_LAYOUT=deb_system; set -- ;; \
		*) set -- --prefix="$(PREFIX)" ;; \
		esac; \
	else set -- --prefix="$(PREFIX)"; fi; \
	$(PYTHON3) -m installer --destdir=build/install-root "$$@" build/install-wheel/*.whl
	@# Like the .deb's upgrade: a running asd writes back and unmounts with the code
	@# that mounted, before that code is replaced; it is started again at the end.
	@if [ -z "$(DESTDIR)" ] && systemctl is-active --quiet asd.service 2>/dev/null; then \
		echo "stopping asd.service for the upgrade"; systemctl stop asd.service; \
		mkdir -p /run/asd && touch /run/asd/make-install-restart; fi
	@# python -m installer never overwrites: replace a previous install (its
	@# package directory and dist-info) from the staged tree
	cd build/install-root && find . -name 'anything_sync_daemon-*.dist-info' -type d | \
		while read -r info; do \
			dir=$$(dirname "$$info"); \
			rm -rf "$(DESTDIR)/$$dir/asd" "$(DESTDIR)/$$dir"/anything_sync_daemon-*.dist-info; \
		done
	cp -a build/install-root/. "$(DESTDIR)/"
	install -d "$(DESTDIR)$(SYSTEMD_UNITDIR)" "$(DESTDIR)$(SYSTEMD_GENERATORDIR)" "$(DESTDIR)$(ASD_LIBDIR)"
	for u in $(ASD_UNITS); do \
		sed -e 's|/usr/bin/asd|$(PREFIX)/bin/asd|g' -e 's|/usr/lib/asd/|$(ASD_LIBDIR)/|g' systemd/$$u >"$(DESTDIR)$(SYSTEMD_UNITDIR)/$$u" \
		&& chmod 644 "$(DESTDIR)$(SYSTEMD_UNITDIR)/$$u"; done
	install -m755 systemd/asd-generator "$(DESTDIR)$(SYSTEMD_GENERATORDIR)/asd-generator"
	install -Dm755 systemd/asd-has-targets "$(DESTDIR)$(ASD_LIBDIR)/asd-has-targets"
	install -Dm644 man/asd.1 "$(DESTDIR)$(MANDIR)/man1/asd.1"
	ln -sf asd.1 "$(DESTDIR)$(MANDIR)/man1/anything-sync-daemon.1"
	install -Dm644 man/asd.conf.5 "$(DESTDIR)$(MANDIR)/man5/asd.conf.5"
	install -Dm644 completions/bash/asd "$(DESTDIR)$(BASHCOMPDIR)/asd"
	ln -sf asd "$(DESTDIR)$(BASHCOMPDIR)/anything-sync-daemon"
	install -Dm644 completions/zsh/_asd "$(DESTDIR)$(ZSHCOMPDIR)/_asd"
	@# never overwrite a configuration someone has edited
	@if [ -e "$(DESTDIR)$(SYSCONFDIR)/asd.conf" ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/asd.conf"; \
	else install -Dm644 packaging/asd.conf "$(DESTDIR)$(SYSCONFDIR)/asd.conf"; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@if [ -z "$(DESTDIR)" ] && [ -e /run/asd/make-install-restart ]; then \
		rm -f /run/asd/make-install-restart; systemctl start asd.service; fi
