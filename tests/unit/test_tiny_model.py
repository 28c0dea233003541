"""The tiny offline checkpoint: deterministic files that transformers loads, spread logits, byte tokens."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from executor_service.tiny_model import (
    TinyModelConfig,
    add_create_tiny_model_arguments,
    create_tiny_model,
    run_create_tiny_model,
)
from executor_service.tiny_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, TINY_VOCAB_SIZE

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
TEXTS = ("Hello", "Hello, world! 123", "héllo wörld ✓", " two  spaces\n\ttab", "日本語 🙂")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def hf_model(checkpoint_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def raw_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))


def test_writes_exactly_the_checkpoint_files(checkpoint_dir: Path) -> None:
    assert sorted(path.name for path in checkpoint_dir.iterdir()) == list(CHECKPOINT_FILES)


def test_same_seed_writes_byte_identical_files(checkpoint_dir: Path, tmp_path: Path) -> None:
    again = create_tiny_model(tmp_path / "again", seed=0)
    for name in CHECKPOINT_FILES:
        assert (again / name).read_bytes() == (checkpoint_dir / name).read_bytes(), name


def test_different_seed_changes_every_matrix_not_the_tokenizer(checkpoint_dir: Path, tmp_path: Path) -> None:
    other = create_tiny_model(tmp_path / "seed1", seed=1)
    weights_0 = load_file(checkpoint_dir / "model.safetensors")
    weights_1 = load_file(other / "model.safetensors")
    assert weights_0.keys() == weights_1.keys()
    for name, tensor in weights_0.items():
        if tensor.dim() == 2:
            assert not torch.equal(tensor, weights_1[name]), name
        else:
            assert torch.equal(tensor, weights_1[name]), name
    assert (other / "tokenizer.json").read_bytes() == (checkpoint_dir / "tokenizer.json").read_bytes()


def test_config_json_describes_the_default_shape(checkpoint_dir: Path, raw_tokenizer: Tokenizer) -> None:
    config = json.loads((checkpoint_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == raw_tokenizer.get_vocab_size(with_added_tokens=True)
    assert config["vocab_size"] == TINY_VOCAB_SIZE == 260
    expected = {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": raw_tokenizer.token_to_id("<|begin_of_text|>"),
        "eos_token_id": raw_tokenizer.token_to_id("<|end_of_text|>"),
    }
    assert {key: config[key] for key in expected} == expected
    generation = json.loads((checkpoint_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}


def test_transformers_loads_every_weight_unchanged(checkpoint_dir: Path, hf_model: PreTrainedModel) -> None:
    weights = load_file(checkpoint_dir / "model.safetensors")
    state = hf_model.state_dict()
    assert state.keys() == weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    assert hf_model.config.vocab_size == TINY_VOCAB_SIZE
    assert hf_model.config.num_key_value_heads == 2
    assert hf_model.config.rope_parameters["rope_theta"] == 10000.0
    assert weights["model.norm.weight"].eq(1.0).all()
    assert 0.9 < weights["model.embed_tokens.weight"].std().item() < 1.1


def test_loads_with_hub_offline(checkpoint_dir: Path) -> None:
    script = (
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps([type(model).__name__, len(tokenizer), tokenizer('Hi').input_ids]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint_dir)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == ["LlamaForCausalLM", 260, [256, 72, 105]]


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_is_bos_then_utf8_bytes_and_round_trips(
    text: str, raw_tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    expected_ids = [BOS_TOKEN_ID, *text.encode("utf-8")]
    assert raw_tokenizer.encode(text).ids == expected_ids
    assert hf_tokenizer.encode(text) == expected_ids
    assert raw_tokenizer.decode(expected_ids) == text
    assert hf_tokenizer.decode(expected_ids, skip_special_tokens=True) == text


def test_raw_and_hf_tokenizers_agree_with_special_tokens_in_text(
    raw_tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    text = "<|im_start|>user\nhi ✓<|im_end|>\n<|end_of_text|>"
    expected_ids = [256, 258, *b"user\nhi ", 226, 156, 147, 259, 10, 257]
    assert raw_tokenizer.encode(text).ids == expected_ids
    assert hf_tokenizer.encode(text) == expected_ids
    assert raw_tokenizer.encode(text, add_special_tokens=False).ids == expected_ids[1:]
    assert hf_tokenizer.encode(text, add_special_tokens=False) == expected_ids[1:]
    assert hf_tokenizer.decode(expected_ids) == "<|begin_of_text|>" + text


def test_decoding_split_multibyte_characters_never_raises(
    raw_tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    check_mark = list("✓".encode("utf-8"))
    assert raw_tokenizer.decode(check_mark[:2]) == "\ufffd"
    assert hf_tokenizer.decode(check_mark[:2]) == "\ufffd"
    assert raw_tokenizer.decode(check_mark) == "✓"
    for token_ids in ([0xFF], [0x80, 0x80], [0xC3], [0xF0, 0x9F, 0x99], list(range(256))):
        assert "\ufffd" in raw_tokenizer.decode(token_ids)
        assert "\ufffd" in hf_tokenizer.decode(token_ids)
    text = "héllo wörld ✓"
    ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
    prefixes = [raw_tokenizer.decode(ids[:end]) for end in range(1, len(ids) + 1)]
    assert prefixes[-1] == text
    assert prefixes[1] == "h\ufffd"


def test_chat_template_renders_chatml_with_bos(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo ✓"}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhéllo ✓<|im_end|>\n<|im_start|>assistant\n"
    )
    without_prompt = hf_tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert without_prompt == "<|begin_of_text|><|im_start|>user\nhéllo ✓<|im_end|>\n"
    assert hf_tokenizer.encode(rendered, add_special_tokens=False).count(BOS_TOKEN_ID) == 1


def test_logits_are_well_spread_so_greedy_has_no_near_ties(hf_model: PreTrainedModel) -> None:
    token_ids = torch.randint(0, 256, (4, 100), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        logits = hf_model(token_ids).logits
    top_two = logits.topk(2, dim=-1).values
    gaps = (top_two[..., 0] - top_two[..., 1]).flatten()
    # Measured for seed 0: median 1.59, smallest of the 400 gaps 1.4e-2, logit std 6.1.
    assert gaps.median().item() > 0.5
    assert (gaps < 1e-3).float().mean().item() < 0.01
    assert logits.std(dim=-1).mean().item() > 3.0


def test_greedy_generation_is_not_one_token_forever(hf_model: PreTrainedModel) -> None:
    prompt = torch.tensor([[BOS_TOKEN_ID, *b"Hello"]])
    with torch.no_grad():
        output = hf_model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    generated = output[0, prompt.shape[1]:].tolist()
    assert len(generated) == 48
    assert len(set(generated)) >= 10


def test_config_validation_rejects_bad_head_counts() -> None:
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        TinyModelConfig(hidden_size=66)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        TinyModelConfig(num_key_value_heads=3)
    with pytest.raises(ValueError, match="positive"):
        TinyModelConfig(num_hidden_layers=0)
    wide = TinyModelConfig(num_hidden_layers=8).with_hidden_size(512)
    assert (wide.hidden_size, wide.intermediate_size, wide.head_dim) == (512, 1408, 128)
    assert wide.num_hidden_layers == 8


def test_cli_writes_the_requested_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_create_tiny_model_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "cli"), "--seed", "3", "--layers", "2", "--hidden-size", "128"]
    )
    assert run_create_tiny_model(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 128, 352)
    assert config["head_dim"] == 32
    weights = load_file(tmp_path / "cli" / "model.safetensors")
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (64, 128)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (128, 352)
    assert "model.layers.2.mlp.down_proj.weight" not in weights
    same_config = TinyModelConfig(num_hidden_layers=2).with_hidden_size(128)
    direct = create_tiny_model(tmp_path / "direct", seed=3, config=same_config)
    cli_weights = (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert (direct / "model.safetensors").read_bytes() == cli_weights
