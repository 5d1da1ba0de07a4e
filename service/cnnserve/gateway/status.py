"""The one mapping from cnnserve errors to what clients read: gRPC status (with rich error details) and
HTTP status, both from the table in :mod:`cnnserve.errors` (each ``ErrorKind`` names its gRPC code and HTTP
status).

``INVALID_ARGUMENT`` carries ``google.rpc.BadRequest`` field violations; anything that is not a
:class:`~cnnserve.errors.CnnserveError` is a bug: its traceback goes to the log and the client reads only
"internal error" (gRPC INTERNAL, HTTP 500).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from cnnserve.errors import CnnserveError, ErrorKind

__all__ = ["grpc_code", "code_name", "to_status", "to_http", "answer_or_abort", "INTERNAL_MESSAGE"]

T = TypeVar("T")

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    """ErrorKind values are the canonical code names, so the mapping is by name."""
    return grpc.StatusCode[kind.code_name]


def code_name(error: BaseException) -> str:
    """The canonical code name a call that failed with ``error`` is counted under (metrics); an HTTP
    server's own refusal (aiohttp's 413 for a body over the limit, say) by the kind of its status."""
    if isinstance(error, CnnserveError):
        return error.kind.code_name
    status = getattr(error, "status", None)
    if isinstance(status, int) and 400 <= status < 500:
        same = [kind for kind in ErrorKind if kind.http_status == status]
        return (same[0] if same else ErrorKind.INVALID_ARGUMENT).code_name
    return ErrorKind.INTERNAL.code_name


def to_http(error: BaseException, method: str = "") -> tuple[int, str]:
    """The HTTP status and the message a failed REST call answers with."""
    if not isinstance(error, CnnserveError):
        log.error("unexpected error in %s", method or "a request", exc_info=error)
        return ErrorKind.INTERNAL.http_status, INTERNAL_MESSAGE
    if error.kind is ErrorKind.INTERNAL:
        log.error("internal error in %s: %s", method or "a request", error.message)
    return error.kind.http_status, error.message


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


async def answer_or_abort(context: grpc.aio.ServicerContext[Any, Any], method: str, call: Awaitable[T]) -> T:
    """``call``'s answer; a failure ends the gRPC call with its status (every gRPC servicer's one way)."""
    try:
        return await call
    except asyncio.CancelledError:
        raise
    except Exception as error:
        status = to_status(error, method)
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("unreachable: abort raises") from None
