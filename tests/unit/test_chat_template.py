"""Our jinja2 chat template rendering vs transformers' `apply_chat_template`, character and token exact."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from executor_service.tiny_tokenizer import write_tiny_tokenizer
from pagewire.default_model import default_model
from scheduler_service.chat_template import ChatTemplate, ChatTurn
from scheduler_service.tokenizer import Tokenizer
from shared.errors import InvalidArgument

# Meta's Llama 3.1 / 3.2 instruct template without its tool branches: whitespace control, `strftime_now`,
# `is defined` tests and a system message pulled out of the conversation.
LLAMA_3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral-7B-Instruct v0.1's template: roles must alternate, enforced with `raise_exception`.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2.5's ChatML template with its tool branches (tools are None here, so the `else` paths run),
# plus a per-turn metadata line through `tojson` (HF's: no HTML escaping, unicode kept, indent/sort_keys),
# a `namespace`, loop controls and a `{% generation %}` block, each of which HF's environment provides.
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0, last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == "user" %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == "assistant" %}
        {%- generation %}{{- message.content }}{% endgeneration %}
    {%- else %}
        {{- message.content }}
    {%- endif %}
    {{- '\\n' + {"turn": ns.turns, "role": message.role, "text": message.content[:12], "last": loop.index0 == ns.last_user} | tojson(sort_keys=True) }}
    {{- '\\n' + {"b": "<&>", "a": [1, 2]} | tojson(indent=2) }}
    {{- '<|im_end|>\\n' }}
    {%- if loop.index0 > 40 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Zephyr's template, indented: written with plain `{% %}` tags on their own lines, so it renders right
# only with trim_blocks (drop the newline after a tag) and lstrip_blocks (drop the indentation before one).
ZEPHYR_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

WITH_SYSTEM = [
    {"role": "system", "content": "You are a pirate. Answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "  Tell me a joke about <html> & \"quotes\".  "},
]
UNICODE = [
    {"role": "system", "content": "Réponds en français. 答えは日本語で。"},
    {"role": "user", "content": "Ça va? 🙂 Привет, κόσμε — naïve café\nsecond line\ttab"},
    {"role": "assistant", "content": "Très bien 👍"},
    {"role": "user", "content": "Et toi ?"},
]
ALTERNATING = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Ça va? 🙂"},
]
CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "What is the capital of France?"}],
    "with-system": WITH_SYSTEM,
    "multi-turn": MULTI_TURN,
    "unicode": UNICODE,
}


def turns(messages: list[dict[str, str]]) -> list[ChatTurn]:
    return [ChatTurn(role=m["role"], content=m["content"]) for m in messages]


@pytest.fixture(scope="module")
def smollm2_hf() -> PreTrainedTokenizerBase:
    path = default_model()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory)
    return directory


def ours_like(hf: PreTrainedTokenizerBase, template: str | None) -> Tokenizer:
    """Our Tokenizer over the HF tokenizer's own backend, special tokens and `template`."""
    return Tokenizer(hf.backend_tokenizer, hf.bos_token, hf.eos_token, template)


def assert_same_as_hf(hf: PreTrainedTokenizerBase, ours: Tokenizer, messages: list[dict[str, str]]) -> None:
    expected_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    rendered = ChatTemplate.from_tokenizer(ours).render(turns(messages), add_generation_prompt=True)
    assert rendered == expected_text
    assert ours.encode_without_special_tokens(rendered) == list(expected_ids)


def test_smollm2_renders_the_documented_prompt(smollm2_hf: PreTrainedTokenizerBase) -> None:
    ours = ours_like(smollm2_hf, smollm2_hf.chat_template)
    rendered = ChatTemplate.from_tokenizer(ours).render(turns(CONVERSATIONS["single-user"]))
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = ours.encode_without_special_tokens(rendered)
    assert ids[0] == smollm2_hf.convert_tokens_to_ids("<|im_start|>") and ids.count(2) == 2  # <|im_end|> is 2


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_smollm2_template_matches_transformers(
    smollm2_hf: PreTrainedTokenizerBase, conversation: list[dict[str, str]]
) -> None:
    assert_same_as_hf(smollm2_hf, ours_like(smollm2_hf, smollm2_hf.chat_template), conversation)


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_tiny_model_template_matches_transformers(tiny_dir: Path, conversation: list[dict[str, str]]) -> None:
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    ours = Tokenizer.from_pretrained_dir(tiny_dir)
    assert ours.chat_template == hf.chat_template
    assert_same_as_hf(hf, ours, conversation)
    # The template writes BOS itself: exactly one, as in HF.
    ids = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(ids).count(hf.bos_token_id) == 1


REAL_WORLD = {
    "llama-3": (LLAMA_3_TEMPLATE, CONVERSATIONS),
    "mistral": (MISTRAL_TEMPLATE, {"single-user": CONVERSATIONS["single-user"], "alternating": ALTERNATING}),
    "qwen2-chatml": (QWEN_TEMPLATE, CONVERSATIONS),
    "zephyr": (ZEPHYR_TEMPLATE, CONVERSATIONS),
}
REAL_WORLD_CASES = [
    pytest.param(template, conversation, id=f"{name}-{conversation_name}")
    for name, (template, conversations) in REAL_WORLD.items()
    for conversation_name, conversation in conversations.items()
]


@pytest.mark.parametrize(("template", "conversation"), REAL_WORLD_CASES)
def test_real_world_templates_match_transformers(
    smollm2_hf: PreTrainedTokenizerBase, template: str, conversation: list[dict[str, str]]
) -> None:
    original = smollm2_hf.chat_template
    smollm2_hf.chat_template = template
    try:
        assert_same_as_hf(smollm2_hf, ours_like(smollm2_hf, template), conversation)
    finally:
        smollm2_hf.chat_template = original


def test_add_generation_prompt_false_matches_transformers(smollm2_hf: PreTrainedTokenizerBase) -> None:
    ours = ChatTemplate.from_tokenizer(ours_like(smollm2_hf, QWEN_TEMPLATE))
    expected = smollm2_hf.apply_chat_template(
        MULTI_TURN, chat_template=QWEN_TEMPLATE, tokenize=False, add_generation_prompt=False
    )
    assert ours.render(turns(MULTI_TURN), add_generation_prompt=False) == expected
    assert not expected.endswith("<|im_start|>assistant\n")


def test_raise_exception_becomes_invalid_argument_with_the_templates_message(
    smollm2_hf: PreTrainedTokenizerBase,
) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        smollm2_hf.apply_chat_template(messages, chat_template=MISTRAL_TEMPLATE, tokenize=False)
    template = ChatTemplate.from_tokenizer(ours_like(smollm2_hf, MISTRAL_TEMPLATE))
    with pytest.raises(InvalidArgument) as raised:
        template.render(turns(messages))
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in str(raised.value)
    with pytest.raises(InvalidArgument, match="Only user and assistant roles are supported!"):
        template.render([ChatTurn("user", "hi"), ChatTurn("system", "be brief")])


@pytest.mark.parametrize(
    ("source", "messages", "keyword"),
    [
        pytest.param("{{ messages[3]['content'] }}", [ChatTurn("user", "hi")], "rejected the messages",
                     id="undefined-index"),
        pytest.param("{{ messages[0].content + 1 }}", [ChatTurn("user", "hi")], "rejected the messages",
                     id="type-error"),
        pytest.param("{% set ns = namespace(_secret=1) %}", [ChatTurn("user", "hi")], "underscore-prefixed",
                     id="sandboxed-namespace"),
        pytest.param("{{ ''.__class__.__mro__[1].__subclasses__() }}", [ChatTurn("user", "hi")],
                     "rejected the messages", id="sandbox-escape"),
    ],
)
def test_template_failures_are_invalid_argument(source: str, messages: list[ChatTurn], keyword: str) -> None:
    with pytest.raises(InvalidArgument, match=keyword):
        ChatTemplate(source, {}).render(messages)


def test_a_template_that_does_not_compile_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="does not compile.*endfor"):
        ChatTemplate("{% for message in messages %}{{ message.content }}", {})


def test_empty_messages_and_empty_roles_are_invalid_argument(tiny_dir: Path) -> None:
    template = ChatTemplate.from_tokenizer(Tokenizer.from_pretrained_dir(tiny_dir))
    with pytest.raises(InvalidArgument, match="`messages` is empty"):
        template.render([])
    with pytest.raises(InvalidArgument, match=r"messages\[1\] has an empty role"):
        template.render([ChatTurn("user", "hi"), ChatTurn("", "hello")])


def test_a_model_without_a_chat_template_is_invalid_argument(tiny_dir: Path) -> None:
    backend = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    bare = Tokenizer(backend, "<|begin_of_text|>", "<|end_of_text|>", None)
    with pytest.raises(InvalidArgument, match="the model has no chat template"):
        ChatTemplate.from_tokenizer(bare)
