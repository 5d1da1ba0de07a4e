# Shared by the scripts in service/docker/ (sourced, not run). Expects to be in the repository root.

# The local stand-ins for Docker Hub's base images (service/docker/local-bases.sh builds them).
LOCAL_PYTHON_IMAGE=cnnserve-local/python:3.11-bookworm
LOCAL_TORCHSERVE_IMAGE=cnnserve-local/torchserve:0.12.0-cpu
LOCAL_TORCHSERVE_GPU_IMAGE=cnnserve-local/torchserve:0.12.0-gpu  # local-bases.sh --gpu: CUDA torch, Python 3.11
WHEELHOUSE=${CNNSERVE_WHEELHOUSE:-var/wheelhouse}
WHEELHOUSE_PORT=${CNNSERVE_WHEELHOUSE_PORT:-3141}
WHEELHOUSE_URL="http://127.0.0.1:${WHEELHOUSE_PORT}/"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# Serve the wheelhouse on 127.0.0.1 (only) for builds that run with host networking; stopped on exit.
wheelhouse_pid=
serve_wheelhouse() {
    [ -d "$WHEELHOUSE" ] && [ -n "$(ls "$WHEELHOUSE"/*.whl 2>/dev/null)" ] \
        || die "no wheels in $WHEELHOUSE: run service/docker/wheelhouse.sh"
    python3 -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$WHEELHOUSE_PORT" \
        >/dev/null 2>&1 &
    wheelhouse_pid=$!
    for _ in $(seq 50); do
        python3 -c "import urllib.request; urllib.request.urlopen('$WHEELHOUSE_URL', timeout=1)" \
            2>/dev/null && return 0
        sleep 0.1
    done
    die "could not serve $WHEELHOUSE on $WHEELHOUSE_URL (port in use? set CNNSERVE_WHEELHOUSE_PORT)"
}
stop_wheelhouse() {
    if [ -n "$wheelhouse_pid" ]; then
        kill "$wheelhouse_pid" 2>/dev/null || true
        wait "$wheelhouse_pid" 2>/dev/null || true
        wheelhouse_pid=
    fi
}

# pip settings for image builds that read the served wheelhouse instead of an index (build args).
offline_pip_args() {
    printf '%s\n' --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=$WHEELHOUSE_URL" \
        --build-arg PIP_EXTRA_INDEX_URL=
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Whether the wheelhouse has the GPU images' wheels too (wheelhouse.sh --gpu).
wheelhouse_has_gpu() { [ -n "$(ls "$WHEELHOUSE"/onnxruntime_gpu-*.whl 2>/dev/null)" ]; }
