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

if docker info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    echo "engine: installing docker.io" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io >&2
fi

# docker.io may have started its own unit (with a bridge); on hosts without systemd it
# did not. Start ours only when nothing answers.
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
echo "engine: $(docker version --format 'server {{.Server.Version}}')" >&2
