#!/bin/sh
# Run TorchServe with the configuration the builder wrote (cnnserve torchserve-config) and stop it cleanly.
#
# TorchServe writes its token keys to key_file.json in its working directory, so it runs in
# $CNNSERVE_STATE_DIR/torchserve: the gateway reads the keys there (the state volume, mounted read-only).
# SIGTERM (docker stop) becomes `torchserve --stop`, which lets the frontend stop its workers itself.
set -eu

state="${CNNSERVE_STATE_DIR:?}/torchserve"
[ -f "$state/config.properties" ] || {
    echo "no $state/config.properties: the builder service writes it (cnnserve torchserve-config)" >&2
    exit 1
}
cd "$state"
mkdir -p tmp logs "${CNNSERVE_REVISIONS_DIR:?}"
rm -f key_file.json  # the keys of an earlier run; TorchServe writes new ones on start
export TMPDIR="$state/tmp" TEMP="$state/tmp" LOG_LOCATION="$state/logs" METRICS_LOCATION="$state/logs"

torchserve --start --foreground --ncs --ts-config config.properties --log-config log4j2.xml "$@" &
child=$!
stop() { torchserve --stop --foreground >/dev/null 2>&1 || kill -TERM "$child" 2>/dev/null || true; }
trap stop TERM INT
status=0
wait "$child" || status=$?
if [ "$status" -gt 128 ]; then  # wait was interrupted by the trap: wait for TorchServe to finish stopping
    status=0
    wait "$child" || status=$?
fi
exit "$status"
