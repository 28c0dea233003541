"""Bearer-token authentication of a gRPC service: `authorization: Bearer SECRET` metadata on every call
to the protected service. The public API checks its --api-key with it, the executor its
--executor-token. Health and reflection stay open, so probes and tools work without the secret.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from shared.errors import Unauthenticated

AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "
API_KEY_HOW = "send `authorization: Bearer <key>` with the key the server was started with (--api-key)"
EXECUTOR_TOKEN_ENV = "PAGEWIRE_EXECUTOR_TOKEN"
EXECUTOR_TOKEN_HOW = (
    f"start the scheduler with this executor's --executor-token (or env {EXECUTOR_TOKEN_ENV}); "
    "`pagewire serve` makes one and gives it to both"
)


def check_authorization(authorization: str | None, secret: str, how: str = API_KEY_HOW, what: str = "API key") -> None:
    """Raises Unauthenticated unless `authorization` (an HTTP header's or gRPC metadata's value) is
    `Bearer <secret>`; the scheme is case-insensitive, the secret compared in constant time. The message
    names `what` is wrong and says `how` to send it, never the secret."""
    if not authorization:
        raise Unauthenticated(f"missing {what}: {how}")
    if not authorization[: len(_BEARER)].lower() == _BEARER:
        raise Unauthenticated(f"the authorization value is not a Bearer token: {how}")
    given = authorization[len(_BEARER) :].strip()
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise Unauthenticated(f"invalid {what}: {how}")


def bearer_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends for `secret` (none without one)."""
    return ((AUTHORIZATION_KEY, f"Bearer {secret}"),) if secret else ()


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls to `protected_service` (a full service name) without the right secret with
    UNAUTHENTICATED, before the handler runs."""

    def __init__(self, secret: str, protected_service: str, how: str = API_KEY_HOW, what: str = "API key") -> None:
        if not secret:
            raise ValueError("BearerAuthInterceptor needs a non-empty secret; leave it out to allow every call")
        self._secret = secret
        self._prefix = f"/{protected_service}/"
        self._how = how
        self._what = what

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        try:
            check_authorization(
                _metadata_value(handler_call_details, AUTHORIZATION_KEY), self._secret, self._how, self._what
            )
        except Unauthenticated as error:
            return _rejecting(handler, str(error))
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED before doing anything."""

    async def abort(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary is not None:

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await abort(context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort(context)
            yield  # unreachable: makes this an async generator like the handler it replaces

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort(context)
            yield  # unreachable, as above

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    raise ValueError("a stream-unary method is protected; teach BearerAuthInterceptor its shape")
