"""The byte-level tokenizer of the tiny offline model: 256 byte tokens plus four special tokens.

Token id `b` (0 <= b < 256) is the single byte `b`; there are no merges, so encoding a text gives its
UTF-8 bytes one token each, preceded by `<|begin_of_text|>`. That keeps the vocabulary small (the
model's vocab_size is exactly `TINY_VOCAB_SIZE`) and makes every test easy to reason about, while still
exercising the hard detokenizer case: a multi-byte character is always split over several tokens.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

NUM_BYTE_TOKENS = 256
BOS_TOKEN_ID = NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(BOS_TOKEN)
EOS_TOKEN_ID = NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(EOS_TOKEN)
IM_START_TOKEN_ID = NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(IM_START_TOKEN)
IM_END_TOKEN_ID = NUM_BYTE_TOKENS + SPECIAL_TOKENS.index(IM_END_TOKEN)
TINY_VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)
MODEL_MAX_LENGTH = 4096

# The template opens with bos like Llama 3's: HF's apply_chat_template(tokenize=True) encodes the
# rendered text with add_special_tokens=False, so a rendered prompt must be encoded without special
# tokens too, or it would start with two bos tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The character the ByteLevel pre-tokenizer maps each byte 0..255 to (GPT-2's table), in byte order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take code points 256, 257, ... in
    byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols: list[str] = []
    num_shifted = 0
    for byte in range(NUM_BYTE_TOKENS):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(NUM_BYTE_TOKENS + num_shifted))
            num_shifted += 1
    return symbols


def build_tiny_tokenizer() -> Tokenizer:
    """Builds the tokenizer; the same object (and the same tokenizer.json bytes) every call."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    special_tokens = [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    tokenizer.add_special_tokens(special_tokens)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != TINY_VOCAB_SIZE:
        raise AssertionError("special tokens did not land right after the 256 byte tokens")
    return tokenizer


def _tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json: what transformers' AutoTokenizer needs beyond tokenizer.json."""
    added_tokens_decoder = {
        str(NUM_BYTE_TOKENS + index): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for index, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        # Matches the post-processor, which prepends bos; transformers may rebuild it from these flags.
        "add_bos_token": True,
        "add_eos_token": False,
        # Decoding must give back exactly the bytes encoded (no " ." -> "." clean-up).
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }


def _write_json(path: Path, content: dict[str, object]) -> None:
    text = json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def write_tiny_tokenizer(output_dir: Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `output_dir`."""
    build_tiny_tokenizer().save(str(output_dir / "tokenizer.json"), pretty=True)
    _write_json(output_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(output_dir / "special_tokens_map.json", _special_tokens_map())
