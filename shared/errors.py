"""Exceptions that carry a gRPC status; one interceptor per service maps them to codes.

Bad client input raises `InvalidArgument` (a ValueError) with a message saying what to change.
"""

from __future__ import annotations

import grpc


class PagewireError(Exception):
    """Base of every error that crosses a service boundary with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(PagewireError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PagewireError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PagewireError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(PagewireError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(PagewireError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(PagewireError):
    """A conflict with a concurrent change (e.g. a stream not yet seen closed): retrying may succeed."""

    code = grpc.StatusCode.ABORTED


class Unavailable(PagewireError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(PagewireError):
    """A missing or wrong API key; the message says what credentials to send."""

    code = grpc.StatusCode.UNAUTHENTICATED


def status_code_of(error: BaseException) -> grpc.StatusCode:
    """The status code a client should see for `error`; anything unexpected is INTERNAL."""
    if isinstance(error, PagewireError):
        return error.code
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
