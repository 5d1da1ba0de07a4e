"""The one mapping from cnnserve errors to gRPC status, with rich error details.

``INVALID_ARGUMENT`` carries ``google.rpc.BadRequest`` field violations; anything that is not a
:class:`~cnnserve.errors.CnnserveError` is a bug: its traceback goes to the log and the client reads only
"internal error".
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from cnnserve.errors import CnnserveError, ErrorKind

__all__ = ["grpc_code", "to_status", "INTERNAL_MESSAGE"]

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    """ErrorKind values are the canonical code names, so the mapping is by name."""
    return grpc.StatusCode[kind.code_name]


def to_status(error: BaseException, method: str = "") -> grpc.Status:
    """The status a failed call answers with."""
    if not isinstance(error, CnnserveError):
        log.error("unexpected error in %s", method or "an RPC", exc_info=error)
        return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE))
    code = grpc_code(error.kind)
    details = []
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    if error.kind is ErrorKind.INTERNAL:
        log.error("internal error in %s: %s", method or "an RPC", error.message)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)
