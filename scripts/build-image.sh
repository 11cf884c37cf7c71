#!/usr/bin/env bash
# Build the one sipdrill image (sipdrill:latest) that runs every lab role.
#
#   scripts/build-image.sh            # what `make image` runs
#
# 1. Base image: BASE_IMAGE (default python:3.11-slim-bookworm) if it is present
#    or can be pulled; otherwise sipdrill-base:bookworm, built with debootstrap
#    from the Debian mirror in apt's own configuration and `docker import`ed.
#    That base is rebuilt only when its recipe changes (label sipdrill.base.recipe).
# 2. Wheelhouse on the host: wheelhouse/deps (the dependencies, rebuilt only when
#    pyproject's dependency list or the host Python changes) and wheelhouse/self
#    (sipdrill's own wheel, every time, reproducible so Docker's cache holds).
# 3. docker build, tagged IMAGE (default sipdrill:latest).
#
# Environment: IMAGE, BASE_IMAGE, LOCAL_BASE_IMAGE (default sipdrill-base:bookworm),
# SIPDRILL_BASE=auto|pull|debootstrap, DEBIAN_MIRROR (default: from apt's sources),
# PYTHON (host Python 3.11 that builds the wheels), DOCKER (default docker).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE=${IMAGE:-sipdrill:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-sipdrill-base:bookworm}
SIPDRILL_BASE=${SIPDRILL_BASE:-auto}
PYTHON=${PYTHON:-python3}
DOCKER=${DOCKER:-docker}
SUITE=bookworm
# Everything the roles need at run time; iproute2 and iptables are for faults
# injected inside a container's network namespace. python3-venv brings pip's
# wheel (ensurepip), so python3-pip itself is not needed.
INCLUDE=python3,python3-venv,iproute2,iptables,ca-certificates
RECIPE_VERSION=1

say() { printf "==> [%3ss] %s\n" "$(( $(date +%s) - t_start ))" "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }

t_start=$(date +%s)

command -v "$DOCKER" >/dev/null || die "no '$DOCKER' command"
"$DOCKER" info >/dev/null 2>&1 || die "the Docker engine does not answer ('$DOCKER info' fails)"

# --- 1. the base image ---------------------------------------------------------

image_exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

image_label() {
    "$DOCKER" image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true
}

# The first Debian archive URI apt uses for $SUITE (deb822 .sources or one-line
# .list), never a host of our own choosing.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        printf '%s\n' "$DEBIAN_MIRROR"
        return
    fi
    "$PYTHON" - "$SUITE" <<'PY'
import glob, sys

suite = sys.argv[1]
files = glob.glob("/etc/apt/sources.list.d/*.sources")
for path in sorted(files):
    for stanza in open(path, encoding="utf-8").read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if (
            "deb" in fields.get("types", [])
            and suite in fields.get("suites", [])
            and fields.get("enabled", ["yes"])[0].lower() != "no"
            and fields.get("uris")
        ):
            print(fields["uris"][0])
            sys.exit(0)
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            print(words[1])
            sys.exit(0)
sys.exit(f"no 'deb' source for {suite} in apt's configuration: set DEBIAN_MIRROR")
PY
}

build_local_base() {
    local recipe hash have root mirror
    recipe="v$RECIPE_VERSION suite=$SUITE variant=minbase include=$INCLUDE arch=$(uname -m)"
    hash=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
    have=$(image_label "$LOCAL_BASE_IMAGE" sipdrill.base.recipe)
    if [ "$have" = "$hash" ]; then
        say "base $LOCAL_BASE_IMAGE is up to date (recipe $hash)"
        return
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root to build $LOCAL_BASE_IMAGE (run as root, or set BASE_IMAGE to an image you have)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    mirror=$(debian_mirror)
    say "building $LOCAL_BASE_IMAGE with debootstrap ($recipe) from $mirror"
    root=$(mktemp -d /var/tmp/sipdrill-base.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$mirror" \
        >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
    rm -f "$root.log"
    # Keep it small: no package lists or archives, no docs but the licences,
    # no manuals or translations. Docker provides resolv.conf and hostname.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
        "$root"/tmp/* "$root"/var/tmp/*
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    : >"$root/etc/resolv.conf"
    printf 'sipdrill\n' >"$root/etc/hostname"
    tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
        --change "LABEL sipdrill.base.recipe=$hash" \
        --change "LABEL sipdrill.base.suite=$SUITE" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$LOCAL_BASE_IMAGE" >/dev/null
    rm -rf "$root"
    trap - EXIT
    say "imported $LOCAL_BASE_IMAGE ($(( $(now) - t_start )) s so far)"
}

NET_TOOLS=auto
case "$SIPDRILL_BASE" in
    auto|pull|debootstrap) ;;
    *) die "SIPDRILL_BASE must be auto, pull or debootstrap (got $SIPDRILL_BASE)" ;;
esac
base=
if [ "$SIPDRILL_BASE" != debootstrap ]; then
    if image_exists "$BASE_IMAGE"; then
        base=$BASE_IMAGE
    elif timeout 120 "$DOCKER" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        base=$BASE_IMAGE
    elif [ "$SIPDRILL_BASE" = pull ]; then
        die "cannot pull $BASE_IMAGE"
    else
        say "cannot pull $BASE_IMAGE (no registry?): using $LOCAL_BASE_IMAGE"
    fi
fi
if [ -z "$base" ]; then
    build_local_base
    base=$LOCAL_BASE_IMAGE
    NET_TOOLS=present
fi

# --- 2. the wheelhouse ---------------------------------------------------------

"$PYTHON" - <<'PY' || die "$PYTHON must be CPython 3.11 on Linux (the image's Python) to build its wheels; set PYTHON"
import platform, sys
assert sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)
assert platform.system() == "Linux"
PY
host_arch=$(uname -m)
image_arch=$("$DOCKER" image inspect -f '{{ .Architecture }}' "$base")
case "$host_arch/$image_arch" in
    x86_64/amd64|aarch64/arm64) ;;
    *) die "the host ($host_arch) and $base ($image_arch) differ: binary wheels would not fit" ;;
esac

mkdir -p wheelhouse/deps wheelhouse/self
"$PYTHON" - >wheelhouse/requirements.new <<'PY'
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(sorted(project["dependencies"])))
PY
deps_key=$( { cat wheelhouse/requirements.new; "$PYTHON" -c 'import sys, sysconfig; print(sys.version, sysconfig.get_platform())'; } | sha256sum | cut -c1-16)
if [ "$(cat wheelhouse/deps/.stamp 2>/dev/null)" = "$deps_key" ]; then
    say "wheelhouse/deps is up to date ($deps_key)"
    rm -f wheelhouse/requirements.new
else
    say "building wheelhouse/deps"
    rm -rf wheelhouse/deps && mkdir -p wheelhouse/deps
    mv wheelhouse/requirements.new wheelhouse/deps/requirements.txt
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check \
        --wheel-dir wheelhouse/deps -r wheelhouse/deps/requirements.txt
    printf '%s\n' "$deps_key" >wheelhouse/deps/.stamp
fi

say "building sipdrill's wheel"
rm -rf wheelhouse/self && mkdir -p wheelhouse/self
# From a clean copy of the work tree: setuptools' build/ keeps files that were
# deleted from the sources and would put them in the wheel.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp pyproject.toml "$src/"
for f in README.md LICENSE; do [ ! -f "$f" ] || cp "$f" "$src/"; done
tar -c --exclude=__pycache__ --exclude='*.pyc' sipdrill | tar -x -C "$src"
# A fixed timestamp makes the wheel byte-identical while the sources are, so
# Docker's layer cache holds across builds.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir wheelhouse/self "$src"
rm -rf "$src"
trap - EXIT

# --- 3. the image --------------------------------------------------------------

say "docker build $IMAGE from $base"
previous=$("$DOCKER" image inspect -f '{{ .Id }}' "$IMAGE" 2>/dev/null || true)
log=$(mktemp)
if ! "$DOCKER" build --build-arg BASE_IMAGE="$base" --build-arg NET_TOOLS="$NET_TOOLS" \
        -t "$IMAGE" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    die "docker build failed"
fi
rm -f "$log"
# The image this build replaced, now untagged: remove it (and its layers) unless
# a container still uses it.
current=$("$DOCKER" image inspect -f '{{ .Id }}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    "$DOCKER" image rm "$previous" >/dev/null 2>&1 || true
fi
size=$("$DOCKER" image inspect -f '{{ .Size }}' "$IMAGE")
say "built $IMAGE from $base: $(( size / 1000000 )) MB in $(( $(now) - t_start )) s"
