"""Typed errors. Each message says what was wrong and what to do about it; the service maps types to status codes."""

from __future__ import annotations


class RaeeError(Exception):
    """Base class of every error raee raises on purpose."""


class InputError(RaeeError, ValueError):
    """A request or argument is malformed: empty or over-long text, bad option, wrong shape."""


class TaskError(RaeeError, ValueError):
    """A task name is unknown or a task definition is invalid."""


class DataError(RaeeError, ValueError):
    """A calibration or test file cannot be read; the message names the file and line."""


class BackboneError(RaeeError):
    """A checkpoint cannot be loaded or does not fit the requested backbone kind."""


class StoreError(RaeeError):
    """An exit store is missing, incomplete or corrupt."""


class StoreMismatchError(StoreError):
    """An exit store was built for another backbone, embedder or task than the one it is used with."""
