#!/usr/bin/env bash
# `make images`: the images docker-compose.yml runs, built without a container registry unless asked to.
#
#   1. the base (BASE_IMAGE): as given (e.g. python:3.11-slim-bookworm, pulled from a registry), else
#      potluck-base:bookworm, a Debian root file system that mmdebstrap builds from the Debian mirror and
#      `docker import` turns into an image (kept: `docker rmi potluck-base:bookworm` to rebuild it);
#      without mmdebstrap, python:3.11-slim-bookworm. The base used is tagged potluck-base:bookworm, the
#      name docker-compose.yml builds on.
#   2. the wheelhouse build/wheelhouse/$VARIANT: the versions installed in $PYTHON's environment
#      (deploy/wheelhouse.py); torch from $TORCH_INDEX_URL when set (the cuda variant's default).
#   3. potluck:$VARIANT (deploy/Dockerfile) and potluck-prometheus:bookworm (deploy/prometheus.Dockerfile).
#
# Environment: PYTHON (required), VARIANT (cpu|cuda), BASE_IMAGE, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR
# (empty: none), TORCH_INDEX_URL. docker builds with BuildKit where the buildx plugin is installed, else
# with the classic builder (DOCKER_BUILDKIT=0); both read the root .dockerignore.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
BASE_TAG=potluck-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR-http://deb.debian.org/debian-security}
OFFICIAL_PYTHON=python:3.11-slim-bookworm
case "$VARIANT" in
  cpu) TORCH_INDEX_URL=${TORCH_INDEX_URL:-} ;;
  cuda) TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128} ;;
  *) echo "make images: VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;;
esac
: "${PYTHON:?set PYTHON to the interpreter of the environment the images should match}"
command -v docker >/dev/null || { echo "make images: docker is not installed" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "make images: no docker daemon answers (start dockerd)" >&2; exit 2; }
if [ -z "${DOCKER_BUILDKIT:-}" ]; then
  if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
fi
started=$(date +%s)

echo "== base image"
base="$BASE_TAG from mmdebstrap ($DEBIAN_MIRROR)"
if [ -n "${BASE_IMAGE:-}" ]; then
  base=$BASE_IMAGE
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || docker pull "$BASE_IMAGE"
  docker tag "$BASE_IMAGE" "$BASE_TAG"
elif docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  base="$BASE_TAG (built before; docker rmi $BASE_TAG to build it again)"
elif command -v mmdebstrap >/dev/null; then
  sources=("deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main")
  [ -n "$DEBIAN_SECURITY_MIRROR" ] && sources+=("deb $DEBIAN_SECURITY_MIRROR bookworm-security main")
  # python3 and its venv module are all the images need from Debian (pip installs the rest); no
  # documentation but the licences, as in the official slim images
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --format=tar bookworm - "${sources[@]}" \
    | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$BASE_TAG"
else
  base=$OFFICIAL_PYTHON
  echo "mmdebstrap is missing (apt-get install mmdebstrap): basing the images on $OFFICIAL_PYTHON from its registry"
  docker image inspect "$OFFICIAL_PYTHON" >/dev/null 2>&1 || docker pull "$OFFICIAL_PYTHON"
  docker tag "$OFFICIAL_PYTHON" "$BASE_TAG"
fi

echo "== wheelhouse build/wheelhouse/$VARIANT"
"$PYTHON" deploy/wheelhouse.py "build/wheelhouse/$VARIANT" ${TORCH_INDEX_URL:+--torch-index-url "$TORCH_INDEX_URL"}

echo "== potluck:$VARIANT"
docker build -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg "VARIANT=$VARIANT" \
  -t "potluck:$VARIANT" .
echo "== potluck-prometheus:bookworm"
docker build -f deploy/prometheus.Dockerfile --build-arg "BASE_IMAGE=$BASE_TAG" \
  -t potluck-prometheus:bookworm deploy

echo "== built in $(( $(date +%s) - started )) s on $base"
for image in "$BASE_TAG" "potluck:$VARIANT" potluck-prometheus:bookworm; do
  docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$image"
done
