"""The API key check of the public gRPC API: `authorization: Bearer KEY` metadata on every Generation call.

Health and reflection stay open, so probes and tools work without the key.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from shared.errors import Unauthenticated
from shared.pb.pagewire.v1 import generate_pb2

PROTECTED_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "


def check_authorization(authorization: str | None, api_key: str) -> None:
    """Raises Unauthenticated unless `authorization` (an HTTP header's or gRPC metadata's value) is
    `Bearer <api_key>`; the scheme is case-insensitive, the key compared in constant time."""
    how = "send `authorization: Bearer <key>` with the key the server was started with (--api-key)"
    if not authorization:
        raise Unauthenticated(f"missing API key: {how}")
    if not authorization[: len(_BEARER)].lower() == _BEARER:
        raise Unauthenticated(f"the authorization value is not a Bearer token: {how}")
    given = authorization[len(_BEARER) :].strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise Unauthenticated(f"invalid API key: {how}")


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls to `pagewire.v1.Generation` without the right key with UNAUTHENTICATED."""

    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("AuthInterceptor needs a non-empty api_key; leave it out to allow every call")
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{PROTECTED_SERVICE}/"):
            return handler
        try:
            check_authorization(_metadata_value(handler_call_details, AUTHORIZATION_KEY), self._api_key)
        except Unauthenticated as error:
            return _rejecting(handler, str(error))
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED before doing anything."""
    if handler.unary_unary is not None:

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # unreachable: makes this an async generator like the handler it replaces

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    raise ValueError(f"{PROTECTED_SERVICE} has a streaming-request method; teach AuthInterceptor its shape")
