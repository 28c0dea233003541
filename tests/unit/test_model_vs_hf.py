"""The paged Llama-family model against Hugging Face transformers on the same random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from executor_service.model import SUPPORTED_ARCHITECTURES, ModelConfig, load_model
from executor_service.model.rope import rope_inverse_frequencies
from executor_service.ops.torch_ops import TorchOps

SMALL = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=101, max_position_embeddings=128
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With theta 5e5 and head_dim 16 this puts frequency 2 in the interpolated band, 0-1 above it, 3-7 below.
    "original_max_position_embeddings": 256,
}
HF_CONFIGS = {
    "llama_gqa4": lambda: transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=1),
    "llama_biases_linear_rope": lambda: transformers.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
    ),
    "qwen2_bias_tied": lambda: transformers.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "mistral_head_dim": lambda: transformers.MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, head_dim=32
    ),
}
PROMPT_LENS = (5, 13, 22)


def save_hf_model(hf_config, directory: Path, **save_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so a wrong mapping cannot hide.
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    hf_model.save_pretrained(directory, **save_kwargs)
    return hf_model


class PagedRun:
    """Drives the model step by step over a shuffled paged KV cache, like the executor would."""

    def __init__(
        self, model, config: ModelConfig, make_attention_metadata, block_size: int, num_blocks: int
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.make_attention_metadata = make_attention_metadata
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(5)).tolist()
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> torch.Tensor:
        """Computes `chunks[seq]` (the next token ids of each sequence); returns logits `[T, vocab]`."""
        input_ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        for seq, token_ids in chunks.items():
            start = self.num_computed.get(seq, 0)
            end = start + len(token_ids)
            table = self.block_tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            input_ids += token_ids
            positions += range(start, end)
            query_lens.append(len(token_ids))
            context_lens.append(end)
            tables.append(list(table))
            self.num_computed[seq] = end
        metadata = self.make_attention_metadata(query_lens, context_lens, tables, self.block_size)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, metadata)
            return self.model.compute_logits(hidden)


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(params=sorted(HF_CONFIGS))
def checkpoint(request, tmp_path):
    hf_model = save_hf_model(HF_CONFIGS[request.param](), tmp_path)
    model, config = load_model(str(tmp_path), torch.float32, torch.device("cpu"), TorchOps())
    return request.param, hf_model, model, config


@pytest.mark.parametrize("block_size", [4, 16])
def test_full_prompt_batch_matches_hf_at_every_position(checkpoint, make_attention_metadata, block_size):
    _, hf_model, model, config = checkpoint
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENS]
    run = PagedRun(model, config, make_attention_metadata, block_size, num_blocks=40)
    logits = run.step(dict(enumerate(prompts)))
    expected = torch.cat([hf_logits(hf_model, prompt) for prompt in prompts])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_mixed_with_decodes_matches_hf(checkpoint, make_attention_metadata):
    """Sequence 0 prefills in 3 chunks while sequence 1 prefills whole and then decodes beside it."""
    _, hf_model, model, config = checkpoint
    generator = torch.Generator().manual_seed(2)
    long_prompt = torch.randint(0, config.vocab_size, (22,), generator=generator).tolist()
    other = torch.randint(0, config.vocab_size, (11,), generator=generator).tolist()
    run = PagedRun(model, config, make_attention_metadata, block_size=4, num_blocks=40)
    first = run.step({0: long_prompt[:9], 1: other[:9]})
    second = run.step({1: other[9:10], 0: long_prompt[9:17]})
    third = run.step({0: long_prompt[17:], 1: other[10:]})
    expected_long = hf_logits(hf_model, long_prompt)
    expected_other = hf_logits(hf_model, other)
    torch.testing.assert_close(third[4], expected_long[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        torch.cat([first[:9], second[1:], third[:5]]), expected_long, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.cat([first[9:], second[:1], third[5:]]), expected_other, atol=1e-4, rtol=1e-4
    )


def test_config_reads_architecture_specific_fields(checkpoint):
    name, hf_model, _, config = checkpoint
    hf_config = hf_model.config
    assert config.num_kv_heads == hf_config.num_key_value_heads
    assert config.head_dim == (32 if name == "mistral_head_dim" else 16)
    assert config.qkv_bias == (name in ("qwen2_bias_tied", "llama_biases_linear_rope"))
    assert config.o_proj_bias == (name == "llama_biases_linear_rope")
    assert config.tie_word_embeddings == (name == "qwen2_bias_tied")
    assert config.sliding_window == (4096 if name == "mistral_head_dim" else None)
    expected_rope_type = {"llama3_rope": "llama3", "llama_biases_linear_rope": "linear"}.get(name)
    assert (config.rope_scaling or {}).get("rope_type") == expected_rope_type


def test_llama3_scaling_keeps_short_wavelengths_and_divides_long_ones():
    plain = rope_inverse_frequencies(16, 500000.0, None)
    scaled = rope_inverse_frequencies(16, 500000.0, LLAMA3_SCALING)
    assert torch.equal(scaled[:2], plain[:2])
    assert plain[2] / 8.0 < scaled[2] < plain[2]
    torch.testing.assert_close(scaled[3:], plain[3:] / 8.0)


def test_unsupported_rope_type_is_rejected():
    with pytest.raises(ValueError, match=r"'yarn'.*default, linear, llama3"):
        rope_inverse_frequencies(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_sharded_checkpoint_loads(tmp_path, make_attention_metadata):
    hf_model = save_hf_model(HF_CONFIGS["llama_gqa4"](), tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, config = load_model(str(tmp_path), torch.float32, torch.device("cpu"), TorchOps())
    prompt = list(range(7))
    logits = PagedRun(model, config, make_attention_metadata, 4, 8).step({0: prompt})
    torch.testing.assert_close(logits, hf_logits(hf_model, prompt), atol=1e-4, rtol=1e-4)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    save_hf_model(HF_CONFIGS["llama_gqa4"](), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), TorchOps())
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_hf_model(HF_CONFIGS["llama_gqa4"](), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), TorchOps())
    message = str(error.value)
    assert "missing ['layers.1.self_attn.qkv_proj.weight[k]']" in message
    assert "unexpected ['model.layers.1.self_attn.extra.weight']" in message


def test_wrong_tensor_shape_is_reported(tmp_path):
    save_hf_model(HF_CONFIGS["llama_gqa4"](), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight .* shape \(63,\), expected \(64,\)"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), TorchOps())


def test_weights_are_cast_to_the_requested_dtype(tmp_path):
    save_hf_model(HF_CONFIGS["qwen2_bias_tied"](), tmp_path)
    model, _ = load_model(str(tmp_path), torch.bfloat16, torch.device("cpu"), TorchOps())
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
