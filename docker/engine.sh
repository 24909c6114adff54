#!/bin/sh
# Make sure a Docker engine answers on the default socket.
#
# Reuses a running engine; otherwise installs Debian's docker.io (when dockerd is
# missing) and starts `dockerd --bridge=none --iptables=false`: no default bridge and
# no firewall rules, so no network with an address beyond loopback ever exists. Every
# container this project runs uses --network none. --default-cgroupns-mode=host lets
# systemd in a container see the cgroup tree it is given at /sys/fs/cgroup (compose v1
# cannot ask for that per container).
set -eu

log=${ASD_DOCKERD_LOG:-/var/log/asd-dockerd.log}

apt_install() { # with a fresh package list if the first try fails
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2; }
}

if ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; then
    echo "engine: installing docker.io" >&2
    # On a host running systemd, docker.io's postinst would start docker.service,
    # which creates the docker0 bridge with an address. policy-rc.d forbids that.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    rc=0
    apt_install docker.io || rc=$?
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || exit "$rc"
fi

# Start our engine only when nothing answers.
if ! docker info >/dev/null 2>&1; then
    echo "engine: starting dockerd --bridge=none --iptables=false (log: $log)" >&2
    mkdir -p "$(dirname "$log")"
    setsid dockerd --bridge=none --iptables=false --ip6tables=false \
        --default-cgroupns-mode=host >>"$log" 2>&1 </dev/null &
    i=0
    until docker info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 60 ]; then
            echo "engine: dockerd did not answer within 60 s; see $log" >&2
            tail -n 20 "$log" >&2 || true
            exit 1
        fi
        sleep 1
    done
fi
# pytest-docker needs a compose command: the v2 plugin if there is one, else
# Debian's docker-compose (v1, reads docker/compose.yml's version 2.4 format).
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    echo "engine: installing docker-compose" >&2
    apt_install docker-compose
fi
echo "engine: $(docker version --format 'server {{.Server.Version}}')" >&2
