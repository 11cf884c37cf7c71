#!/usr/bin/env bash
# Build sipdrill-node:bookworm: a Docker engine in a container (Docker-in-Docker),
# to add swarm worker nodes on one machine for multi-node tests, from Debian's
# own packages (debootstrap, docker.io): no registry, no pull.
#
#   scripts/build-node-image.sh      # NODE_IMAGE=sipdrill-node:bookworm
#
# How a node runs (tests/orchestrator/swarm_nodes.py does this):
#   docker run -d --cap-add ALL --cap-drop SYS_RESOURCE \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#     --security-opt systempaths=unconfined --device-cgroup-rule 'a *:* rwm' \
#     --cgroupns private -v /var/lib/docker --network NODES --ip ADDR IMAGE
# not --privileged: it asks for every capability, and a host whose bounding
# set lacks one (this one: CAP_SYS_RESOURCE) refuses to start the container
# ("unable to apply caps: operation not permitted").
# Environment: NODE_IMAGE, DEBIAN_MIRROR (default: deb.debian.org's, as apt has it), DOCKER.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NODE_IMAGE=${NODE_IMAGE:-sipdrill-node:bookworm}
DOCKER=${DOCKER:-docker}
SUITE=bookworm
INCLUDE=docker.io,iproute2,iptables,procps,ca-certificates
RECIPE_VERSION=1
die() { printf 'build-node-image: error: %s\n' "$*" >&2; exit 1; }

recipe="v$RECIPE_VERSION suite=$SUITE variant=minbase include=$INCLUDE arch=$(uname -m)"
hash=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
have=$("$DOCKER" image inspect -f '{{ index .Config.Labels "sipdrill.node.recipe" }}' "$NODE_IMAGE" 2>/dev/null || true)
if [ "$have" = "$hash" ]; then
    echo "$NODE_IMAGE is up to date (recipe $hash)" >&2
    exit 0
fi
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)}
[ -n "$mirror" ] || die "no Debian mirror in apt's sources: set DEBIAN_MIRROR"
root=$(mktemp -d /var/tmp/sipdrill-node.XXXXXX)
trap 'rm -rf "$root" "$root.log"' EXIT
echo "debootstrap $SUITE ($INCLUDE) from $mirror: a few minutes" >&2
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; die "debootstrap failed"; }
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/man/* \
    "$root"/usr/share/doc/* "$root"/usr/share/locale/* "$root"/var/log/*
: >"$root/etc/resolv.conf"
# What --privileged would have done for the inner engine: /sys and the cgroup
# hierarchies writable (Docker mounts them read-only in a container).
cat >"$root/usr/local/bin/sipdrill-node" <<'SH'
#!/bin/sh
mount -o remount,bind,rw /sys 2>/dev/null || true
for d in /sys/fs/cgroup /sys/fs/cgroup/*; do
    mount -o remount,bind,rw "$d" 2>/dev/null || echo "sipdrill-node: $d stays read-only" >&2
done
exec dockerd --storage-driver overlay2 --host unix:///var/run/docker.sock "$@"
SH
chmod 755 "$root/usr/local/bin/sipdrill-node"
tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change "LABEL sipdrill.node.recipe=$hash" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENTRYPOINT ["/usr/local/bin/sipdrill-node"]' \
    - "$NODE_IMAGE" >/dev/null
echo "built $NODE_IMAGE" >&2
