"""A checkpoint's Jinja chat template, compiled once, rendered with Hugging Face's semantics (no transformers).

The environment copies transformers' `_cached_compile_jinja_template` (utils/chat_template_utils.py):
an `ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks` and the `loopcontrols` extension,
a no-op `{% generation %}` block, `raise_exception`, `strftime_now`, a `tojson` filter with
`json.dumps`' arguments (no HTML escaping), a restricted `dict` and a `namespace` that rejects
underscore names. The render receives what `apply_chat_template` passes: `messages`, `tools=None`,
`documents=None`, `add_generation_prompt` and the tokenizer's named special tokens (`bos_token`,
`eos_token`, ...; absent ones stay undefined, as in HF).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from scheduler_service.tokenizer import Tokenizer
from shared.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One message of a conversation as a client sends it."""

    role: str
    content: str


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged (HF's inactive AssistantTracker)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:  # noqa: A002 (the name templates call it with)
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` / `dict.fromkeys(...)` without exposing the type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature trick, as HF)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got "
                f"{name!r}. Please rename the attribute."
            )


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment


class ChatTemplate:
    """One compiled template. `render` raises InvalidArgument for empty conversations, empty roles and
    anything the template raises (its `raise_exception` message included)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        """`special_tokens` maps names such as "bos_token" to their text. Raises InvalidArgument when the
        template does not compile."""
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as error:
            raise InvalidArgument(f"the model's chat template does not compile: {error}") from error
        self._special_tokens = dict(special_tokens)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The tokenizer's template with its BOS/EOS texts as `bos_token`/`eos_token` (HF's
        `special_tokens_map` variables that our tokenizer knows). Raises InvalidArgument when the
        checkpoint has no chat template or it does not compile."""
        if tokenizer.chat_template is None:
            raise InvalidArgument(
                "the model has no chat template, so `messages` cannot be rendered: send `text` or "
                "`token_ids` with the prompt already formatted, or serve a checkpoint that has one"
            )
        tokens = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        special_tokens = {name: token for name, token in tokens.items() if token is not None}
        return cls(tokenizer.chat_template, special_tokens)

    def render(self, messages: Sequence[ChatTurn], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidArgument("`messages` is empty: send at least one {role, content} message")
        for index, message in enumerate(messages):
            if not message.role:
                raise InvalidArgument(f"messages[{index}] has an empty role: set it, e.g. to \"user\"")
        chat = [{"role": message.role, "content": message.content} for message in messages]
        try:
            return self._template.render(
                **self._special_tokens,
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as error:  # noqa: BLE001 (everything raised here is the template's own evaluation)
            raise InvalidArgument(f"the model's chat template rejected the messages: {error}") from error
