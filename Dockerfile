# One image for every role of the lab: `sipdrill serve dns|pool|backup|clients`.
#
# Build it with `make image` (scripts/build-image.sh), which fills wheelhouse/
# on the host first: this Dockerfile never reaches a package index for Python
# packages. BASE_IMAGE is any Debian-like image with Python 3.11:
#   python:3.11-slim-bookworm  when a registry is reachable (NET_TOOLS=auto -> apt)
#   sipdrill-base:bookworm     built by debootstrap, with iproute2 and iptables
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# auto: install iproute2 and iptables with apt only if the base lacks them;
# apt: always install them; present: the base has them, never run apt.
ARG NET_TOOLS=auto
RUN set -eu; \
    missing=; \
    for tool in ip tc iptables; do command -v "$tool" >/dev/null 2>&1 || missing=1; done; \
    case "$NET_TOOLS" in \
      present) [ -z "$missing" ] || { echo "NET_TOOLS=present, but the base lacks ip/tc/iptables" >&2; exit 1; } ;; \
      apt|auto) if [ "$NET_TOOLS" = apt ] || [ -n "$missing" ]; then \
          apt-get update; \
          DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 iptables; \
          rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
        fi ;; \
      *) echo "NET_TOOLS must be auto, apt or present (got $NET_TOOLS)" >&2; exit 1 ;; \
    esac; \
    python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'; \
    python3 -m venv /opt/sipdrill; \
    /opt/sipdrill/bin/python -m pip --version

ENV PATH=/opt/sipdrill/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8

# Metadata before the wheels: on this engine's legacy builder every instruction
# costs a container, so what changes on each build comes last.
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="sipdrill" \
      org.opencontainers.image.description="One image for every sipdrill lab role" \
      sipdrill.image="1" \
      sipdrill.base="${BASE_IMAGE}"
ENTRYPOINT ["sipdrill"]
CMD ["--help"]

# The services run as this user, with no capabilities: the container's
# NET_ADMIN is for the orchestrator's faults (`docker exec --user 0`), never
# for the service (docs/runtimes.md), and no set-uid program (su, mount, ...)
# is left to get it back. The lab's shared volume is mounted at
# /var/lib/sipdrill/lab: Docker gives a new volume this directory's owner.
RUN groupadd --system --gid 10001 sipdrill \
    && useradd --system --uid 10001 --gid sipdrill --home-dir /var/lib/sipdrill \
        --no-create-home --shell /usr/sbin/nologin sipdrill \
    && mkdir -p /var/lib/sipdrill/lab \
    && chown -R sipdrill:sipdrill /var/lib/sipdrill \
    && find / -xdev -type f -perm /6000 -exec chmod ug-s {} +
WORKDIR /var/lib/sipdrill

# Dependencies first: this layer stays cached while only sipdrill changes.
COPY wheelhouse/deps/ /tmp/wheelhouse/deps/
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse/deps \
        -r /tmp/wheelhouse/deps/requirements.txt \
    && rm -rf /tmp/wheelhouse/deps

COPY wheelhouse/self/ /tmp/wheelhouse/self/
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheelhouse/self/sipdrill-*.whl \
    && rm -rf /tmp/wheelhouse \
    && pip check \
    && sipdrill --version
USER sipdrill
