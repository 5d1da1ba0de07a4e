#!/usr/bin/env bash
# Fill a wheelhouse (default var/wheelhouse, git-ignored) with every wheel the cnnserve images install, so the
# images build where containers cannot reach a package index: the images' pip reads it over loopback HTTP
# (service/docker/compose-smoke.sh serves it). Wheels are for CPython 3.11 on glibc x86_64 Linux (Debian 12 and
# python:3.11-slim). Idempotent: pip skips wheels it already has.
#
#   service/docker/wheelhouse.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-${CNNSERVE_WHEELHOUSE:-var/wheelhouse}}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
requirements=service/docker/requirements
mkdir -p "$out"

target=(
    --only-binary=:all:
    --implementation cp --python-version 3.11 --abi cp311
    --platform manylinux_2_36_x86_64 --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64
)
start=$(date +%s)
# One resolution per image, so each image's set is complete on its own. setuptools builds cnnserve itself.
download() {  # pip's warnings about this machine's own file:// indexes are noise here
    "$python" -m pip download --quiet --dest "$out" "${target[@]}" "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
for list in builder torchserve-base worker-cpu gateway; do
    echo "wheelhouse: $list" >&2
    download -r "$requirements/$list.txt"
done
download 'setuptools>=68' 'wheel'
count=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
echo "wheelhouse: $count wheels, $(du -sh "$out" | cut -f1) in $out ($(( $(date +%s) - start )) s)"
