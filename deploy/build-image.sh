#!/bin/bash
# Builds the node agent's image (deploy/Containerfile) with podman, from Debian's
# packages and PyPI only: where no registry serves debian:12, the base image is made
# with mmdebstrap and imported (cached; `podman rmi` it to rebuild).
#   deploy/build-image.sh [TAG]        (default localhost/interceptor:VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
tag=${1:-localhost/interceptor:$version}
base=localhost/interceptor-base:debian12

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman-engine.conf}

if ! podman image exists "$base"; then
    # Check-Valid-Until: the node's mirror may be a dated snapshot
    mmdebstrap --quiet --variant=apt --aptopt='Acquire::Check-Valid-Until "false"' bookworm - \
        | podman import - "$base" >/dev/null
fi

# pip inside the build trusts what the host trusts (a TLS-inspecting proxy's CA, if the
# network has one); mounted for the build only, not part of the image
printf '[global]\ncert = /run/host-ca.crt\n' > "$scratch/pip.conf"
# --network=host: the RUN steps reach the mirrors without a CNI bridge, which would turn
# on the host's IP forwarding and leave it on
dangling() { podman images -q --no-trunc --filter dangling=true | sort; }
dangling > "$scratch/before"
podman build --quiet --pull=never --network=host --build-arg "BASE=$base" \
    -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$scratch/pip.conf:/etc/pip.conf:ro" \
    -f deploy/Containerfile -t "$tag" . >/dev/null
# the build stage (where the wheel was made) stays behind untagged: drop this build's own
dangling | comm -13 "$scratch/before" - | xargs -r podman rmi -f >/dev/null
echo "$tag"
