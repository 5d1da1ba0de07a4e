#!/usr/bin/env bash
# Fill a wheelhouse (default var/wheelhouse, git-ignored) with every wheel the cnnserve images install, so the
# images build where containers cannot reach a package index: the images' pip reads it over loopback HTTP
# (service/docker/compose-smoke.sh serves it). Wheels are for CPython 3.11 on glibc x86_64 Linux (Debian 12 and
# python:3.11-slim). Idempotent: pip skips wheels it already has. --gpu adds the GPU images' wheels (the CUDA
# build of torch with its nvidia-* wheels, onnxruntime-gpu: several GB), for compose.sh --local-bases --gpu.
#
#   service/docker/wheelhouse.sh [--gpu] [DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."

gpu=false
case "${1:-}" in
    --gpu) gpu=true; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "usage: $0 [--gpu] [DIR]" >&2; exit 1 ;;
esac
out=${1:-${CNNSERVE_WHEELHOUSE:-var/wheelhouse}}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
requirements=service/docker/requirements
mkdir -p "$out"

target=(
    --only-binary=:all:
    --implementation cp --python-version 3.11 --abi cp311
    --platform manylinux2014_x86_64 --platform linux_x86_64
)
# Every glibc from bookworm's 2.36 down to 2.17: pip does not widen an explicit --platform, and torch's
# nvidia-* dependencies use several of these tags.
for glibc in $(seq 36 -1 17); do target+=(--platform "manylinux_2_${glibc}_x86_64"); done
start=$(date +%s)
# One resolution per image, so each image's set is complete on its own. setuptools builds cnnserve itself.
download() {  # pip's warnings about this machine's own file:// indexes are noise here
    "$python" -m pip download --quiet --dest "$out" "${target[@]}" "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
lists=(builder torchserve-base worker-cpu gateway)
$gpu && lists+=(torchserve-base-gpu worker-gpu)  # Python 3.11 wheels: the local GPU stand-in's Python
for list in "${lists[@]}"; do
    echo "wheelhouse: $list" >&2
    download -r "$requirements/$list.txt"
done
download 'setuptools>=68' 'wheel'
count=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
echo "wheelhouse: $count wheels, $(du -sh "$out" | cut -f1) in $out ($(( $(date +%s) - start )) s)"
