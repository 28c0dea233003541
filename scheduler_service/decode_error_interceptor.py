"""Undecodable requests (corrupt wire format, invalid UTF-8 in a string field) become INVALID_ARGUMENT.

grpc deserializes a request before any handler or interceptor body runs and answers UNKNOWN with the
exception's class name when the deserializer raises. This interceptor wraps each handler's deserializer
so that a `DecodeError` yields an `UndecodableRequest` instead, and wraps the handler so that it aborts
with INVALID_ARGUMENT (naming the message type and what was wrong) before the servicer sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse; `message` says why."""

    message: str


def _decoding(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as error:
            return UndecodableRequest(
                f"the request could not be decoded ({error}); send a serialized protobuf message of the "
                "method's request type with valid UTF-8 in every string field"
            )

    return deserialize


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps request decoding failures of unary-unary and unary-stream methods to INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserializer = _decoding(handler.request_deserializer)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, UndecodableRequest):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, UndecodableRequest):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for response in stream_behavior(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, deserializer, handler.response_serializer
            )
        return handler
