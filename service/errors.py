"""The service's own error types, and the one place where errors become gRPC status codes.

Only raee's typed errors (RaeeError and its subclasses) map to a specific code; anything else is a defect and
leaves as INTERNAL with a generic message, logged with its traceback.
"""

from __future__ import annotations

import grpc

from raee.errors import BackboneError, DataError, InputError, RaeeError, StoreError, TaskError


class NotReady(RaeeError):
    """The backbone and stores are still loading."""


class Draining(RaeeError):
    """The server is shutting down and takes no new work."""


class QueueFull(RaeeError):
    """Admitting the request would pass max_queue texts not yet answered. retry_after_s: when the client was told to
    come back (service.throttle.Pushback), once the servicer has told it."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyStreams(RaeeError):
    """max_streams ClassifyStream calls are already open."""


class StreamIdle(RaeeError):
    """A stream sent no request for stream_idle_s seconds and was closed."""


class DeadlineExpired(RaeeError):
    """The request's deadline passed, or cannot be met given the work ahead of it."""


class MalformedRequest(InputError):
    """The bytes on the wire are not a valid protobuf message of the method's request type."""


class AdminDisabled(RaeeError):
    """ReloadStore is not served on this listener."""


class Unauthenticated(RaeeError):
    """ReloadStore was called without the admin token, or with a wrong one."""


class OutsideStoreRoots(RaeeError):
    """A reload named a path outside the directories this server may load stores from."""


class ReloadBusy(RaeeError):
    """Another reload is running; reloads run one at a time."""


class ReloadCancelled(RaeeError):
    """A reload was abandoned because its caller went away or its deadline passed."""


class UnknownTask(InputError):
    """No store is loaded for the task asked for."""


class StartupError(RaeeError):
    """The server cannot start: a port is taken, a file is unreadable."""


# Most specific first: the first matching type decides.
STATUS = (
    (MalformedRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownTask, grpc.StatusCode.NOT_FOUND),  # as Triton and KServe answer for an unknown model
    ((StoreError, BackboneError), grpc.StatusCode.FAILED_PRECONDITION),
    ((InputError, TaskError, DataError), grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((NotReady, Draining, StreamIdle), grpc.StatusCode.UNAVAILABLE),
    ((DeadlineExpired, ReloadCancelled), grpc.StatusCode.DEADLINE_EXCEEDED),
    ((AdminDisabled, OutsideStoreRoots), grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ReloadBusy, grpc.StatusCode.ABORTED),
    (RaeeError, grpc.StatusCode.FAILED_PRECONDITION),  # refused on purpose, for a reason of the server's state
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of an error: by its raee type; INTERNAL for anything raee did not raise on purpose."""
    for types, code in STATUS:
        if isinstance(exc, types):
            return code
    return grpc.StatusCode.INTERNAL


def message_for(exc: BaseException, code: grpc.StatusCode) -> str:
    """What the caller reads: the error's own message, except for defects, whose details stay in the log."""
    return "internal error; see the server log" if code == grpc.StatusCode.INTERNAL else str(exc)
