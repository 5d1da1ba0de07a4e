#!/bin/bash
# What the official TorchServe image's entrypoint does (cnnserve's images replace it).
set -e
if [[ "$1" = "serve" ]]; then
    shift 1
    torchserve --start --ts-config /home/model-server/config.properties --disable-token-auth "$@"
    tail -f /dev/null
else
    eval "$@"
fi
