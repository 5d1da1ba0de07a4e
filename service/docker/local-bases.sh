#!/usr/bin/env bash
# Build local stand-ins for the Docker Hub base images, for machines that cannot pull from Docker Hub:
#
#   cnnserve-local/python:3.11-bookworm   Debian 12 (debootstrap, needs root) with Python 3.11 and venv:
#                                         stands in for python:3.11-slim
#   cnnserve-local/torchserve:0.12.0-cpu  the official TorchServe image's layout (local/Dockerfile.torchserve-base)
#   cnnserve-local/torchserve:0.12.0-gpu  with --gpu: the same with the CUDA build of torch (Python 3.11, so
#                                         the wheelhouse's cp311 wheels fit; pytorch/torchserve:0.12.0-gpu
#                                         has Python 3.9)
#
# Needs: root, debootstrap, a running Docker engine, Debian's mirror (apt) and a wheelhouse
# (service/docker/wheelhouse.sh, made here when missing). Images that exist are kept; --rebuild remakes them.
#
#   service/docker/local-bases.sh [--rebuild] [--gpu]
set -euo pipefail
cd "$(dirname "$0")/../.."
source service/docker/common.sh

rebuild=false
gpu=false
for arg in "$@"; do
    case "$arg" in
        --rebuild) rebuild=true ;;
        --gpu) gpu=true ;;
        *) die "usage: $0 [--rebuild] [--gpu]" ;;
    esac
done
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=${CNNSERVE_ROOTFS_DIR:-var/docker/rootfs-bookworm}
mkdir -p var/docker
trap stop_wheelhouse EXIT
start=$(date +%s)

if $rebuild || ! image_exists "$LOCAL_PYTHON_IMAGE"; then
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    log "debootstrap: Debian bookworm + Python 3.11 into $rootfs"
    rm -rf "$rootfs"
    mkdir -p "$(dirname "$rootfs")"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$mirror" >var/docker/debootstrap.log 2>&1 \
        || die "debootstrap failed: see var/docker/debootstrap.log"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$LOCAL_PYTHON_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
log "$LOCAL_PYTHON_IMAGE: $(docker run --rm --network none "$LOCAL_PYTHON_IMAGE" python3 --version)"

if $rebuild || ! image_exists "$LOCAL_TORCHSERVE_IMAGE"; then
    [ -d "$WHEELHOUSE" ] || service/docker/wheelhouse.sh "$WHEELHOUSE"
    serve_wheelhouse
    log "building $LOCAL_TORCHSERVE_IMAGE (Java 17 from Debian, TorchServe from the wheelhouse)"
    mapfile -t pip_args < <(offline_pip_args)
    docker build --network host --file service/docker/local/Dockerfile.torchserve-base \
        --build-arg "PYTHON_BASE_IMAGE=$LOCAL_PYTHON_IMAGE" "${pip_args[@]}" \
        --tag "$LOCAL_TORCHSERVE_IMAGE" . >var/docker/torchserve-base.log 2>&1 \
        || { tail -30 var/docker/torchserve-base.log >&2; die "build failed: var/docker/torchserve-base.log"; }
    stop_wheelhouse
fi
log "$LOCAL_TORCHSERVE_IMAGE: $(docker run --rm --network none --entrypoint torchserve \
    "$LOCAL_TORCHSERVE_IMAGE" --version)"

if $gpu && { $rebuild || ! image_exists "$LOCAL_TORCHSERVE_GPU_IMAGE"; }; then
    [ -d "$WHEELHOUSE" ] && wheelhouse_has_gpu || service/docker/wheelhouse.sh --gpu "$WHEELHOUSE"
    serve_wheelhouse
    log "building $LOCAL_TORCHSERVE_GPU_IMAGE (CUDA torch from the wheelhouse)"
    mapfile -t pip_args < <(offline_pip_args)
    docker build --network host --file service/docker/local/Dockerfile.torchserve-base \
        --build-arg "PYTHON_BASE_IMAGE=$LOCAL_PYTHON_IMAGE" --build-arg BASE_REQUIREMENTS=torchserve-base-gpu.txt \
        "${pip_args[@]}" --tag "$LOCAL_TORCHSERVE_GPU_IMAGE" . >var/docker/torchserve-base-gpu.log 2>&1 \
        || { tail -30 var/docker/torchserve-base-gpu.log >&2; die "build failed: var/docker/torchserve-base-gpu.log"; }
    stop_wheelhouse
fi
$gpu && log "$LOCAL_TORCHSERVE_GPU_IMAGE: $(docker run --rm --network none --entrypoint torchserve \
    "$LOCAL_TORCHSERVE_GPU_IMAGE" --version)"
log "local base images ready in $(( $(date +%s) - start )) s"
