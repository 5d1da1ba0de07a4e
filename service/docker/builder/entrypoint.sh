#!/bin/sh
# The builder's one job, run before TorchServe starts (docker-compose.yml: service_completed_successfully):
#  1. build the default models into an empty model store (cnnserve bootstrap skips archives that exist);
#  2. re-archive them for CNNSERVE_ARCHIVE_DEVICE (cpu | gpu) when they were archived for the other device
#     (model-config.yaml deviceType decides whether TorchServe gives workers a GPU);
#  3. write TorchServe's config.properties and log4j2.xml into the state volume (as cnnserve torchserve-config
#     does; listeners on CNNSERVE_TS_HOST).
set -eu

store="${CNNSERVE_MODEL_STORE:?}"
work="${CNNSERVE_BUILD_DIR:?}"
device="${CNNSERVE_ARCHIVE_DEVICE:-cpu}"
start=$(date +%s)

cnnserve bootstrap --model-store "$store" --work-dir "$work"

for archive in "$store"/*.mar; do
    [ -e "$archive" ] || continue
    name=$(basename "$archive" .mar)
    archived=$(python3 - "$archive" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as mar:
    text = mar.read("model-config.yaml").decode() if "model-config.yaml" in mar.namelist() else ""
print(next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("deviceType:")), "cpu"))
PY
)
    [ "$archived" = "$device" ] && continue
    [ -d "$work/$name/export" ] || {
        echo "$archive is for $archived, and $work/$name/export is gone: delete the archive to rebuild it" >&2
        exit 1
    }
    echo "re-archiving $name for $device (was $archived)" >&2
    cnnserve archive "$work/$name/export" --model-store "$store" --device "$device"
done

# What `cnnserve torchserve-config` writes (settings from the CNNSERVE_* environment), without its last step:
# it prints the torchserve command line, so it insists on TorchServe being installed, which this image is not.
python3 - <<'PY'
import argparse

from cnnserve.cli.serving import add_torchserve_arguments, torchserve_settings
from cnnserve.torchserve import TorchServe

parser = argparse.ArgumentParser()
add_torchserve_arguments(parser)
settings = torchserve_settings(parser.parse_args([]))
config, log_config = TorchServe(settings).write_config()
print(f"wrote {config} and {log_config} (listeners on {settings.host})")
PY
echo "builder: done in $(( $(date +%s) - start )) s; archives: $(cd "$store" && echo *.mar)" >&2
