"""A tiny gRPC health probe for container healthchecks: ``python -m cnnserve.gateway.probe``.

Exit status 0 when the service answers SERVING, 1 otherwise. No extra binaries in the image.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


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
    if args.tls_ca:
        with open(args.tls_ca, "rb") as stream:
            channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(stream.read()))
    else:
        channel = grpc.insecure_channel(args.target)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name} {error.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(state)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
