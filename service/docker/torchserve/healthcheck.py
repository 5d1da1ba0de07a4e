"""Container healthcheck for cnnserve's TorchServe: healthy once every model has a READY worker.

Reads the management address from config.properties and the management key from key_file.json (both in
``$CNNSERVE_STATE_DIR/torchserve``), then asks the management API (list, then describe each model). Exit 0:
healthy; 1: not (yet). Standard library only, and plain enough for any Python the base image has.
"""

import json
import os
import sys
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0


def read_properties(path: Path) -> dict:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


def get(url: str, key: str) -> object:
    headers = {"Authorization": "Bearer " + key} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as reply:
        return json.loads(reply.read())


def main() -> int:
    state = Path(os.environ.get("CNNSERVE_STATE_DIR", "/srv/cnnserve/state")) / "torchserve"
    config = read_properties(state / "config.properties")
    # Listeners on 0.0.0.0 (compose network) are reached on loopback from inside the container.
    address = config["management_address"].replace("0.0.0.0", "127.0.0.1")
    key = ""
    if config.get("disable_token_authorization", "false") != "true":
        key = json.loads((state / "key_file.json").read_text())["management"]["key"]
    models = [entry["modelName"] for entry in get(address + "/models", key)["models"]]
    if not models:
        print("no models registered", file=sys.stderr)
        return 1
    for name in models:
        statuses = [w["status"] for entry in get(address + "/models/" + name, key) for w in entry["workers"]]
        if "READY" not in statuses:
            print(name + ": no READY worker (" + ", ".join(statuses) + ")", file=sys.stderr)
            return 1
    print("READY: " + ", ".join(models))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, KeyError, ValueError) as exc:  # not listening yet, no key file yet, ...
        print(type(exc).__name__ + ": " + str(exc), file=sys.stderr)
        sys.exit(1)
