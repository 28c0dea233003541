"""The one place where exceptions become gRPC status codes; no stack trace ever reaches a client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from shared.errors import status_code_of

log = structlog.get_logger(__name__)


def _status(error: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    code = status_code_of(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal_error", method=method)
        return code, "internal error; the server logged the details"
    return code, str(error)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps `shared.errors` exceptions (and ValueError) to their codes, anything else to INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 (this is the mapping point)
                    await context.abort(*_status(error, method))

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in stream_behavior(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 (this is the mapping point)
                    await context.abort(*_status(error, method))

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
