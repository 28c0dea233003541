"""Errors in OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}` with the status codes its clients expect."""

from __future__ import annotations

from typing import Any

import grpc
import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from shared.errors import status_code_of

log = structlog.get_logger(__name__)

# gRPC status -> (HTTP status, OpenAI error type). The openai client raises BadRequestError for 400,
# AuthenticationError 401, NotFoundError 404, RateLimitError 429, InternalServerError >= 500.
_HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequestError"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "BadRequestError"),
    grpc.StatusCode.ALREADY_EXISTS: (400, "BadRequestError"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "AuthenticationError"),
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.INTERNAL: (500, "InternalServerError"),
}


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def http_status_of(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) for an exception; internal errors keep their details in the log."""
    code = status_code_of(error)
    status, error_type = _HTTP_STATUS.get(code, (500, "InternalServerError"))
    if status == 500:
        log.error("http_internal_error", error=repr(error))
        return status, error_type, "internal error; the server logged the details"
    return status, error_type, str(error)


def error_response(error: BaseException) -> JSONResponse:
    status, error_type, message = http_status_of(error)
    return JSONResponse(error_body(message, error_type, status), status_code=status)


async def handle_exception(request: Request, error: Exception) -> JSONResponse:
    return error_response(error)


async def handle_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """Pydantic's complaints, one line per field, as a 400 (FastAPI's own answer would be a 422)."""
    problems = []
    param = None
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        param = param or location or None
        problems.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
    message = "invalid request: " + "; ".join(problems)
    return JSONResponse(error_body(message, "BadRequestError", 400, param), status_code=400)


async def handle_http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) in the same shape."""
    error_type = "NotFoundError" if error.status_code == 404 else "BadRequestError"
    return JSONResponse(
        error_body(str(error.detail), error_type, error.status_code), status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )
