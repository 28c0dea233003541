"""The size limits of one client request, in one place; generate.proto's comments quote these numbers.

Each limit is checked at the API boundary with an InvalidArgument naming it (see `validate_request_fields`
and shared/sampling_params.py), so an oversized field costs the server no tokenizing and is never echoed.
"""

from __future__ import annotations

from shared.errors import InvalidArgument

MAX_REQUEST_ID_CHARS = 256
MAX_CACHE_SALT_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# A text prompt (or the contents of chat messages) longer than max_model_len * this many UTF-8 bytes
# cannot fit and is refused before tokenizing. The bound is max(this, the longest vocabulary entry in
# UTF-8 bytes) per token: a byte-level BPE token covers at most as many input bytes as its entry has.
MIN_PROMPT_BYTES_PER_TOKEN = 64


def validate_request_fields(request_id: str | None, cache_salt: str | None) -> None:
    """Raises InvalidArgument when the request id or cache salt is longer than its limit."""
    for name, value, limit in (
        ("request_id", request_id, MAX_REQUEST_ID_CHARS),
        ("cache_salt", cache_salt, MAX_CACHE_SALT_CHARS),
    ):
        if value is not None and len(value) > limit:
            raise InvalidArgument(f"{name} has {len(value)} characters; send at most {limit}")


def validate_prompt_bytes(num_bytes: int, max_model_len: int, bytes_per_token: int) -> None:
    """Raises InvalidArgument when `num_bytes` of prompt text cannot fit in `max_model_len` tokens."""
    limit = max_model_len * max(bytes_per_token, MIN_PROMPT_BYTES_PER_TOKEN)
    if num_bytes > limit:
        raise InvalidArgument(
            f"the prompt text has {num_bytes} UTF-8 bytes, more than {limit} bytes can fit in max_model_len "
            f"({max_model_len}) tokens; shorten the prompt"
        )
