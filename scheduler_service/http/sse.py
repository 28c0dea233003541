"""Server-sent events as OpenAI streams them, and a streaming response that aborts its requests however it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One `data: {json}` event; compact JSON, non-ASCII text kept as UTF-8."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class AbortingStreamingResponse(StreamingResponse):
    """An SSE response that calls `on_close` once it ends: finished, failed, or cut short by the client.

    Starlette cancels the body iterator when the client disconnects, and never starts it when the
    client is gone before the first byte; `on_close` runs in every case, so the requests behind the
    stream are aborted and their blocks freed.
    """

    def __init__(self, content: AsyncIterable[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
