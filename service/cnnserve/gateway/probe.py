"""A tiny gRPC health probe for container healthchecks: ``python -m cnnserve.gateway.probe``.

Exit status 0 when the service answers SERVING, 1 otherwise. No extra binaries in the image.

It follows the gateway's own settings in its environment (the container's ``CNNSERVE_GATEWAY_*``): it dials
the gateway's ``--listen`` port on loopback, with TLS when ``CNNSERVE_GATEWAY_TLS_CERT`` is set (trusting
``--tls-ca``, else that certificate: right when it is self-signed), by a name the certificate holds, with
the gateway's token. Flags override each part.
"""

from __future__ import annotations

import argparse
import os
import sys

from cnnserve.client import ClassifierClient
from cnnserve.errors import CnnserveError


def main(argv: list[str] | None = None) -> int:
    from cnnserve.deployment import gateway_client
    from cnnserve.gateway.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("CNNSERVE_TARGET", ""),
        help="HOST:PORT (env CNNSERVE_TARGET; default: the CNNSERVE_GATEWAY_LISTEN port on loopback)",
    )
    parser.add_argument(
        "--service", default="", help="'' (overall), cnnserve.v1.Classifier or cnnserve.v1.Classifier/<model>"
    )
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("CNNSERVE_GATEWAY_TLS_CA", ""),
        help="CA bundle, turns TLS on (env CNNSERVE_GATEWAY_TLS_CA; default: CNNSERVE_GATEWAY_TLS_CERT)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token (default: CNNSERVE_GATEWAY_TOKEN; health checks need none)",
    )
    args = parser.parse_args(argv)
    try:
        gateway = argparse.ArgumentParser()
        add_arguments(gateway)  # the gateway's settings as its environment gives them
        settings = settings_from_args(gateway.parse_args([]))
        client = gateway_client(settings, tls_ca=args.tls_ca or None, target=args.target or None)
        if args.token is not None:
            client["token"] = args.token or None
        with ClassifierClient(**client, timeout=args.timeout) as connected:
            state = connected.health(args.service)
    except CnnserveError as error:
        print(f"unhealthy: {error.kind.code_name} {error.message}", file=sys.stderr)
        return 1
    print(state)
    return 0 if state == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
