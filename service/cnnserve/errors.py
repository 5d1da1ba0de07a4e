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
    │   └── QueueFullError *           RESOURCE_EXHAUSTED 429  TorchServe's job queue for the model is full
    ├── DeadlineExceededError          DEADLINE_EXCEEDED 504 the caller's deadline passed
    ├── UnavailableError *             UNAVAILABLE      503  TorchServe not reachable (connection failure)
    │   └── WorkerDiedError *          UNAVAILABLE      503  a TorchServe worker died with the request
    └── InternalError                  INTERNAL         500  a component failed: the message says where

``*``: :attr:`CnnserveError.retryable`, a repeat of the same request may succeed (TorchServe restarts a dead
worker; a queue drains); the gateway retries a Classify once on these, and on nothing else.

Anything that is not a ``CnnserveError`` is a bug: transports log its traceback and answer INTERNAL with a
generic message (the TorchServe handler adds an error id that finds the traceback in the model log). The
mapping to gRPC status codes lives in one place, ``cnnserve.gateway.status``; the HTTP codes are what the
TorchServe handler answers with. Between the worker and the gateway an error travels as its kind's name in a
JSON body (:func:`cnnserve.contract.error_json`), and :func:`error_from_kind` rebuilds it.
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
    "QueueFullError",
    "DeadlineExceededError",
    "UnavailableError",
    "WorkerDiedError",
    "InternalError",
    "error_from_kind",
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
    retryable: bool = False  # sending the same request again may succeed (see the tree above)

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


class QueueFullError(OverloadedError):
    """TorchServe refused the request: the model's job queue is full (``job_queue_size``)."""

    retryable = True


class DeadlineExceededError(CnnserveError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class UnavailableError(CnnserveError):
    """The backend cannot be reached (connection refused, dropped), or a worker died."""

    kind = ErrorKind.UNAVAILABLE
    retryable = True


class WorkerDiedError(UnavailableError):
    """The TorchServe worker holding the request died (killed, crashed); TorchServe restarts it."""


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
