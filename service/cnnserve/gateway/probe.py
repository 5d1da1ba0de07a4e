"""A tiny gRPC health probe for container healthchecks: ``python -m cnnserve.gateway.probe``.

Exit status 0 when the service answers SERVING, 1 otherwise. No extra binaries in the image.
"""

from __future__ import annotations

import argparse
import os
import sys

from cnnserve.client import ClassifierClient
from cnnserve.errors import CnnserveError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("CNNSERVE_TARGET", "127.0.0.1:50051"))
    parser.add_argument(
        "--service", default="", help="'' (overall), cnnserve.v1.Classifier or cnnserve.v1.Classifier/<model>"
    )
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--tls-ca", default=os.environ.get("CNNSERVE_GATEWAY_TLS_CA", ""), help="CA bundle for TLS"
    )
    args = parser.parse_args(argv)
    try:
        with ClassifierClient(args.target, tls_ca=args.tls_ca or None, timeout=args.timeout) as client:
            state = client.health(args.service)
    except CnnserveError as error:
        print(f"unhealthy: {error.kind.code_name} {error.message}", file=sys.stderr)
        return 1
    print(state)
    return 0 if state == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
