#!/bin/sh
# The builder's one job, run before TorchServe starts (docker-compose.yml: service_completed_successfully):
#  1. train and export the default models when they are missing (cnnserve bootstrap: minutes, once);
#  2. archive every export in the build cache again, for CNNSERVE_ARCHIVE_DEVICE (cpu | gpu): seconds, and
#     the archives then carry this image's handler code and device (model-config.yaml deviceType decides
#     whether TorchServe gives workers a GPU), so upgrading cnnserve or switching to GPUs needs no training;
#  3. write TorchServe's config.properties and log4j2.xml into the state volume (cnnserve torchserve-config;
#     listeners on CNNSERVE_TS_HOST).
set -eu

store="${CNNSERVE_MODEL_STORE:?}"
work="${CNNSERVE_BUILD_DIR:?}"
device="${CNNSERVE_ARCHIVE_DEVICE:-cpu}"
start=$(date +%s)

cnnserve bootstrap --model-store "$store" --work-dir "$work"

for export_dir in "$work"/*/export; do
    [ -f "$export_dir/model_card.json" ] || continue
    cnnserve archive "$export_dir" --model-store "$store" --device "$device"
done

cnnserve torchserve-config >/dev/null
echo "builder: done in $(( $(date +%s) - start )) s; archives: $(cd "$store" && echo *.mar)" >&2
