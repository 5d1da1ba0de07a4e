#!/usr/bin/env bash
# Boot the docker-compose stack for real, call it, tear it down, and print how long each part took
# (`make compose-smoke`). Needs a running Docker engine, docker-compose and .venv (make setup): the calls go
# through the gateway with the host's `cnnserve` client, and straight to TorchServe's HTTP API with its token.
#
#   service/docker/compose-smoke.sh [--host-network] [--local-bases | --official-bases] [--keep-volumes]
#
#   --host-network    containers on the host's network (service/docker/compose.sh --host-network)
#   --local-bases     local stand-ins for the Docker Hub base images and the wheelhouse (compose.sh
#                     --local-bases); the default uses the official images when they are present or can be
#                     pulled, and the stand-ins otherwise
#   --official-bases  the official images (python:3.11-slim, pytorch/torchserve:0.12.0-cpu) or fail
#   --keep-volumes    keep the volumes (model store, build cache): the next run skips training
#
# Runs as compose project "cnnserve-smoke" (COMPOSE_PROJECT_NAME), so it leaves a deployment named
# otherwise alone; it stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
source service/docker/common.sh

flags=()
bases=auto
host_network=false
keep_volumes=false
for arg in "$@"; do
    case "$arg" in
        --host-network) flags+=(--host-network); host_network=true ;;
        --local-bases) bases=local ;;
        --official-bases) bases=official ;;
        --keep-volumes) keep_volumes=true ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $arg (try --help)" ;;
    esac
done
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-cnnserve-smoke}
seconds() { echo $(( $(date +%s) - $1 )); }
cnnserve=.venv/bin/cnnserve
gateway=127.0.0.1:50051

command -v docker >/dev/null || die "docker is missing (Debian: apt-get install docker.io)"
command -v docker-compose >/dev/null || die "docker-compose is missing (Debian: apt-get install docker-compose)"
docker info >/dev/null 2>&1 || die "no Docker engine answers: start dockerd (e.g. 'dockerd >/tmp/dockerd.log 2>&1 &')"
[ -x "$cnnserve" ] || die "$cnnserve is missing: run make setup"
for port in 50051 9464 8080; do
    ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
        || die "127.0.0.1:$port is taken (a local 'cnnserve serve' or another stack?): stop it first"
done

if [ "$bases" = auto ]; then
    bases=official
    for image in python:3.11-slim pytorch/torchserve:0.12.0-cpu; do
        if ! image_exists "$image" && ! docker pull --quiet "$image" >/dev/null 2>&1; then
            log "cannot pull $image (no Docker Hub?): using local stand-ins for the base images"
            bases=local
            break
        fi
    done
fi
mkdir -p var/docker
overall=$(date +%s)
bases_s=0
if [ "$bases" = local ]; then
    flags+=(--local-bases)
    # Complete the wheelhouse for the current requirements (pip skips the wheels it has), then the stand-ins.
    wheels=$(service/docker/wheelhouse.sh 2>&1) || { echo "$wheels" >&2; die "service/docker/wheelhouse.sh failed"; }
    log "${wheels##*$'\n'}"
    start=$(date +%s)
    service/docker/local-bases.sh
    bases_s=$(seconds "$start")
fi
compose() { service/docker/compose.sh "${flags[@]}" "$@"; }

dump_logs() {
    log "--- last log lines of each service ---"
    compose logs --no-color --tail 40 >&2 || true
}
teardown() {
    local start
    start=$(date +%s)
    if $keep_volumes; then compose down --remove-orphans; else compose down --volumes --remove-orphans; fi \
        >/dev/null 2>&1 || true
    log "down in $(seconds "$start") s"
}
on_exit() {
    local status=$?
    trap - EXIT
    [ "$status" -eq 0 ] || dump_logs
    teardown
    exit "$status"
}
container() { compose ps -q "$1"; }
health() { docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1"; }

mode="$( $host_network && echo host || echo bridge ) network, $bases base images"
log "compose smoke: project $COMPOSE_PROJECT_NAME, $mode"
trap on_exit EXIT

start=$(date +%s)
compose build >var/docker/compose-smoke-build.log 2>&1 \
    || { tail -30 var/docker/compose-smoke-build.log >&2; die "build failed: var/docker/compose-smoke-build.log"; }
build_s=$(seconds "$start")
log "images built in ${build_s} s"

# `up -d` returns once the builder has finished and TorchServe is healthy (depends_on conditions).
start=$(date +%s)
timeout 1800 service/docker/compose.sh "${flags[@]}" up -d 2>&1 | grep -v '^$' >&2 \
    || die "docker-compose up failed"
id=$(container gateway)
[ -n "$id" ] || die "no gateway container"
until [ "$(health "$id")" = running/healthy ]; do
    case "$(health "$id")" in running/starting) ;; *) die "gateway is $(health "$id")" ;; esac
    [ "$(seconds "$start")" -lt 1800 ] || die "gateway not healthy after 1800 s"
    sleep 2
done
up_s=$(seconds "$start")
log "stack healthy in ${up_s} s ($(compose logs --no-color builder | grep -o 'builder: done.*' | tail -1))"

start=$(date +%s)
work=$(mktemp -d)
"$cnnserve" --help >/dev/null
.venv/bin/python - "$work/digit.png" <<'PY'
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

digits = load_digits()
Image.fromarray((digits.images[0] * 255 / 16).astype(np.uint8)).resize((28, 28)).save(sys.argv[1])
PY

# TorchServe's HTTP inference API, with the inference token from key_file.json.
key=$(docker exec "$(container torchserve)" python -c \
    'import json; print(json.load(open("/srv/cnnserve/state/torchserve/key_file.json"))["inference"]["key"])')
python3 - "$work/digit.png" "$key" <<'PY'
import json, sys, urllib.error, urllib.request

headers = {"Authorization": "Bearer " + sys.argv[2], "Content-Type": "application/octet-stream"}
request = urllib.request.Request("http://127.0.0.1:8080/predictions/lenet", data=open(sys.argv[1], "rb").read(),
                                 headers=headers, method="PUT")
try:
    reply = json.load(urllib.request.urlopen(request, timeout=30))
except urllib.error.HTTPError as error:
    sys.exit(f"TorchServe HTTP: {error.code} {error.read().decode(errors='replace')[:500]}")
best = reply["predictions"][0]["top_k"][0]
assert best["label"] == "0", reply
print(f"TorchServe HTTP: lenet -> {best['label']} ({best['probability']:.3f}) on {reply['device']}", file=sys.stderr)
PY
if ! $host_network; then
    ! (exec 3<>/dev/tcp/127.0.0.1/8081) 2>/dev/null || die "TorchServe's management API is reachable from the host"
fi
if command -v ss >/dev/null; then  # the stack's ports: on loopback only, bridge or host networking
    exposed=$(ss -Hltn | awk '{print $4}' | grep -E ':(8080|8081|8082|7070|7071|50051|9464)$' \
        | grep -vE '^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):' || true)
    [ -z "$exposed" ] || die "listening beyond loopback: $exposed"
fi

# The gateway, through the gRPC client.
"$cnnserve" classify --target "$gateway" "$work/digit.png" --model lenet --json >"$work/classify.json"
"$cnnserve" shapes --remote --target "$gateway" --model alexnet --input 3,224,224 --json >"$work/shapes.json"
"$cnnserve" finetune --target "$gateway" --model lenet --dataset digits --steps 3 --json >"$work/finetune.jsonl"
"$cnnserve" classify --target "$gateway" "$work/digit.png" --model lenet --json >"$work/classify-after.json"
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
classify = json.loads((work / "classify.json").read_text())
best = classify["results"][0]["top_k"][0]
assert best["label"] == "0", classify
print(f"Classify: lenet -> {best['label']} ({best['probability']:.3f}), revision {classify['revision']}", file=sys.stderr)
shapes = json.loads((work / "shapes.json").read_text())
assert shapes["output_shape"] == [10] and shapes["layers"], shapes
print(f"GetLayerShapes: alexnet {shapes['input_shape']} -> {shapes['output_shape']}, "
      f"{len(shapes['layers'])} layers", file=sys.stderr)
text, documents, decoder = (work / "finetune.jsonl").read_text(), [], json.JSONDecoder()
while text.strip():  # one JSON object per step, then an indented summary
    document, end = decoder.raw_decode(text.strip())
    documents.append(document)
    text = text.strip()[end:]
summary = documents[-1]
assert summary["steps"] == 3 and len(documents) == 4, documents
print(f"FineTuneStep: 3 steps, lenet now at revision {summary['revision']}", file=sys.stderr)
after = json.loads((work / "classify-after.json").read_text())
assert after["revision"] == summary["revision"], after
print(f"Classify after fine-tuning: revision {after['revision']}", file=sys.stderr)
PY
rm -rf "$work"
calls_s=$(seconds "$start")
log "calls passed in ${calls_s} s"

trap - EXIT
teardown
log "compose smoke passed ($mode): base images ${bases_s} s, build ${build_s} s, up ${up_s} s," \
    "calls ${calls_s} s, total $(seconds "$overall") s"
