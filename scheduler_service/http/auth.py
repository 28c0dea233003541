"""The HTTP API key check: `Authorization: Bearer KEY` on every /v1 route (as vLLM; /health, /metrics and /version stay open)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from shared.bearer_auth import check_authorization


def require_api_key(api_key: str) -> Callable[[Request], None]:
    """A FastAPI dependency raising Unauthenticated (401) unless the request carries the key."""

    def check(request: Request) -> None:
        check_authorization(request.headers.get("authorization"), api_key)

    return check
