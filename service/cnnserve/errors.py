"""cnnserve's errors: one tree, each error carrying the kind of failure it is.

::

    CnnserveError                      kind            HTTP  gRPC
    ├── InvalidInputError              INVALID_ARGUMENT 400  INVALID_ARGUMENT (+ google.rpc.BadRequest)
    │   └── ShapeMismatchError         INVALID_ARGUMENT 400  the network cannot take an input shape
    ├── NotFoundError                  NOT_FOUND        404  unknown model, version or revision
    ├── ConflictError                  ABORTED          409  expected_revision is stale
    ├── FailedPreconditionError        FAILED_PRECONDITION 412  data missing, feature disabled, ...
    ├── UnauthenticatedError           UNAUTHENTICATED  401  missing or wrong bearer token
    ├── OverloadedError                RESOURCE_EXHAUSTED 429  load shed, batch over the limit
    ├── DeadlineExceededError          DEADLINE_EXCEEDED 504 the caller's deadline passed
    └── UnavailableError               UNAVAILABLE      503  backend down, worker died

Anything that is not a ``CnnserveError`` is a bug: transports log its traceback and answer INTERNAL with a
generic message. The mapping to gRPC status codes lives in one place, ``cnnserve.gateway.status``; the HTTP
codes below are what the TorchServe handler answers with, and the gateway maps them back with
:func:`kind_from_http_status`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ErrorKind",
    "FieldViolation",
    "CnnserveError",
    "InvalidInputError",
    "ShapeMismatchError",
    "NotFoundError",
    "ConflictError",
    "FailedPreconditionError",
    "UnauthenticatedError",
    "OverloadedError",
    "DeadlineExceededError",
    "UnavailableError",
    "InternalError",
    "error_from_kind",
    "kind_from_http_status",
]


class ErrorKind(enum.Enum):
    """Kinds of failure; the value is the gRPC canonical code name, ``http_status`` the HTTP answer."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400)
    NOT_FOUND = ("NOT_FOUND", 404)
    ABORTED = ("ABORTED", 409)
    FAILED_PRECONDITION = ("FAILED_PRECONDITION", 412)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 401)
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", 429)
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504)
    UNAVAILABLE = ("UNAVAILABLE", 503)
    INTERNAL = ("INTERNAL", 500)

    @property
    def code_name(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as ``google.rpc.BadRequest.FieldViolation`` describes it."""

    field: str
    description: str


class CnnserveError(Exception):
    """Base of every error cnnserve raises on purpose."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations


class InvalidInputError(CnnserveError):
    kind = ErrorKind.INVALID_ARGUMENT

    @classmethod
    def for_field(cls, field: str, description: str) -> InvalidInputError:
        """An error about one field, with the message and the field violation saying the same."""
        return cls(f"{field}: {description}", violations=(FieldViolation(field, description),))


class ShapeMismatchError(InvalidInputError):
    """The network cannot take an input of this shape; names the layer where it breaks."""

    def __init__(
        self, message: str, *, layer: str, input_shape: tuple[int, ...], field: str = "input_shape"
    ) -> None:
        super().__init__(message, violations=(FieldViolation(field, message),))
        self.layer = layer
        self.input_shape = input_shape


class NotFoundError(CnnserveError):
    kind = ErrorKind.NOT_FOUND


class ConflictError(CnnserveError):
    kind = ErrorKind.ABORTED


class FailedPreconditionError(CnnserveError):
    kind = ErrorKind.FAILED_PRECONDITION


class UnauthenticatedError(CnnserveError):
    kind = ErrorKind.UNAUTHENTICATED


class OverloadedError(CnnserveError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class DeadlineExceededError(CnnserveError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class UnavailableError(CnnserveError):
    kind = ErrorKind.UNAVAILABLE


class InternalError(CnnserveError):
    """A failure reported by another component as internal; its message is safe to show."""

    kind = ErrorKind.INTERNAL


_ERROR_BY_KIND: dict[ErrorKind, type[CnnserveError]] = {
    ErrorKind.INVALID_ARGUMENT: InvalidInputError,
    ErrorKind.NOT_FOUND: NotFoundError,
    ErrorKind.ABORTED: ConflictError,
    ErrorKind.FAILED_PRECONDITION: FailedPreconditionError,
    ErrorKind.UNAUTHENTICATED: UnauthenticatedError,
    ErrorKind.RESOURCE_EXHAUSTED: OverloadedError,
    ErrorKind.DEADLINE_EXCEEDED: DeadlineExceededError,
    ErrorKind.UNAVAILABLE: UnavailableError,
    ErrorKind.INTERNAL: InternalError,
}


def error_from_kind(
    kind: ErrorKind, message: str, violations: tuple[FieldViolation, ...] = ()
) -> CnnserveError:
    """Rebuild the error another process reported (the handler's JSON error body, say)."""
    return _ERROR_BY_KIND[kind](message, violations=violations)


def kind_from_http_status(status: int) -> ErrorKind:
    """The error kind for an HTTP status the handler (or TorchServe itself) answered with."""
    for kind in ErrorKind:
        if kind.http_status == status:
            return kind
    if status == 400 or 400 < status < 500:
        return ErrorKind.INVALID_ARGUMENT
    if status in (502, 503):
        return ErrorKind.UNAVAILABLE
    return ErrorKind.INTERNAL
