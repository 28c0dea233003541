"""GGUF checkpoints: metadata -> ModelConfig, llama.cpp names, dequantization and Q/K un-permutation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from executor_service.model.gguf_checkpoint import GGUFCheckpoint, unpermute_rope_rows
from executor_service.model.loader import SafetensorsCheckpoint, load_model, open_checkpoint
from executor_service.model.rope import rope_inverse_frequencies
from executor_service.ops import create_ops_backend
from executor_service.tiny_model import TinyModelConfig, create_tiny_model, random_tiny_weights
from executor_service.tiny_tokenizer import EOS_TOKEN_ID, TINY_VOCAB_SIZE

# Row lengths of 256 and 512 let every tensor take a 256-element K-quant block.
CONFIG = TinyModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, rope_theta=50000.0)  # fmt: skip
CPU = torch.device("cpu")
# One file holding every required type: per HF leaf name, the type of layer 0 and layer 1.
MIXED_TYPES = {
    "self_attn.q_proj.weight": (Q.Q4_0, Q.Q6_K),
    "self_attn.k_proj.weight": (Q.Q4_1, Q.Q4_K),
    "self_attn.v_proj.weight": (Q.Q4_K, Q.Q8_0),
    "self_attn.o_proj.weight": (Q.Q6_K, Q.F16),
    "mlp.gate_proj.weight": (Q.F16, Q.BF16),
    "mlp.up_proj.weight": (Q.BF16, Q.Q4_0),
    "mlp.down_proj.weight": (Q.Q8_0, Q.Q4_1),
}
_LEAVES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def llama_cpp_name(hf_name: str) -> str:
    """The tensor name llama.cpp's convert_hf_to_gguf.py writes for a Hugging Face Llama tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_LEAVES[module]}.{kind}"


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: each head's halves become interleaved pairs."""
    half_head = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, 2, half_head, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def random_blocks(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a type gguf-py cannot quantize to, with small finite f16 scales (K-quants)."""
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = values.shape[0]
    blocks = rng.integers(0, 256, size=(rows, values.shape[1] // block_elements, block_bytes), dtype=np.uint8)
    scales = {Q.Q4_K: [(0, 0.01), (2, 0.002)], Q.Q6_K: [(block_bytes - 2, 0.003)]}.get(qtype, [])
    for offset, scale in scales:
        blocks[:, :, offset : offset + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(
    path: Path,
    weights: dict[str, torch.Tensor],
    types: Callable[[str], Q] = lambda _: Q.F32,
    arch: str = "llama",
    edit: Callable[[gguf.GGUFWriter], None] = lambda _: None,
    seed: int = 0,
) -> Path:
    """Writes `weights` (Hugging Face names) as llama.cpp does: renamed, Q/K permuted, typed by `types`."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(CONFIG.num_hidden_layers)
    writer.add_context_length(CONFIG.max_position_embeddings)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_attention_heads)
    writer.add_head_count_kv(CONFIG.num_key_value_heads)
    writer.add_rope_dimension_count(CONFIG.head_dim)
    writer.add_rope_freq_base(CONFIG.rope_theta)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_vocab_size(TINY_VOCAB_SIZE)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    edit(writer)
    for hf_name, tensor in weights.items():
        values = tensor.numpy()
        if ".q_proj." in hf_name:
            values = llama_cpp_permute(values, CONFIG.num_attention_heads)
        elif ".k_proj." in hf_name:
            values = llama_cpp_permute(values, CONFIG.num_key_value_heads)
        qtype = types(hf_name)
        if qtype in (Q.Q4_K, Q.Q6_K, Q.IQ4_NL):
            writer.add_tensor(llama_cpp_name(hf_name), random_blocks(values, qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(llama_cpp_name(hf_name), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mixed_type(hf_name: str) -> Q:
    for leaf, per_layer in MIXED_TYPES.items():
        if hf_name.endswith(leaf):
            return per_layer[int(hf_name.split(".")[2])]
    return Q.Q8_0 if hf_name.endswith(("embed_tokens.weight", "lm_head.weight")) else Q.F32


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    tensors = random_tiny_weights(CONFIG, seed=7)
    # Norms are all ones in the tiny model; vary them so a swapped norm would show.
    generator = torch.Generator().manual_seed(1)
    for name, tensor in tensors.items():
        if tensor.dim() == 1:
            tensors[name] = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
    return tensors


def _ours(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    model, _ = load_model(path, dtype, CPU, create_ops_backend("auto", "cpu"))
    return dict(model.named_parameters())


def _fused(hf: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Our fused parameters of `layer` built from Hugging Face tensors."""
    prefix = f"model.layers.{layer}."
    qkv = torch.cat([hf[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"])
    gate_up = torch.cat([hf[f"{prefix}mlp.{p}_proj.weight"] for p in ("gate", "up")])
    ours = {"self_attn.qkv_proj.weight": qkv, "mlp.gate_up_proj.weight": gate_up}
    for leaf in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"):  # fmt: skip
        ours[leaf] = hf[prefix + leaf]
    return {f"layers.{layer}.{name}": tensor for name, tensor in ours.items()}


def _expected(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = {
        "embed_tokens.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
    }
    if "lm_head.weight" in hf:
        expected["lm_head.weight"] = hf["lm_head.weight"]
    for layer in range(CONFIG.num_hidden_layers):
        expected.update(_fused(hf, layer))
    return expected


def test_f32_file_round_trips_the_original_weights_through_the_qk_permutation(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    path = write_gguf(tmp_path / "tiny-f32.gguf", weights)
    ours = _ours(path)
    expected = _expected(weights)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_mixed_quantized_file_equals_transformers_gguf_load(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    path = write_gguf(tmp_path / "tiny-mixed.gguf", weights, mixed_type)
    reader = gguf.GGUFReader(path)
    assert {tensor.tensor_type for tensor in reader.tensors} >= {
        Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K
    }  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    expected = _expected(reference.state_dict())
    ours = _ours(path)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    # Served in bfloat16: the same float32 values, rounded once.
    for name, tensor in _ours(path, torch.bfloat16).items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_dequantized_values_are_gguf_py_s_for_each_type(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    path = write_gguf(tmp_path / "tiny-mixed.gguf", weights, mixed_type)
    ours = _ours(path)
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    q_size = CONFIG.num_attention_heads * CONFIG.head_dim
    for layer in range(CONFIG.num_hidden_layers):
        for leaf, rows in (("attn_q", slice(0, q_size)), ("attn_v", slice(q_size + q_size // 2, None))):
            tensor = tensors[f"blk.{layer}.{leaf}.weight"]
            values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            if leaf == "attn_q":
                values = unpermute_rope_rows(values, CONFIG.num_attention_heads)
            assert torch.equal(ours[f"layers.{layer}.self_attn.qkv_proj.weight"][rows], values), tensor.name


def test_unpermute_inverts_llama_cpp_permute_for_weights_and_biases() -> None:
    rows = torch.arange(3 * 8 * 5, dtype=torch.float32).reshape(24, 5)
    permuted = torch.from_numpy(llama_cpp_permute(rows.numpy(), 3))
    assert not torch.equal(permuted, rows)
    assert torch.equal(unpermute_rope_rows(permuted, 3), rows)
    bias = torch.arange(24, dtype=torch.float32)
    assert torch.equal(unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(bias.numpy(), 3)), 3), bias)
    # Head 0 of 8 rows: llama.cpp's pairs (0, 4), (1, 5), ... back to halves 0..3 | 4..7.
    assert permuted[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


def test_metadata_becomes_the_model_config(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    tied = {name: tensor for name, tensor in weights.items() if name != "lm_head.weight"}
    (tmp_path / "only").mkdir()
    path = write_gguf(tmp_path / "only" / "Tiny-Chat.Q8_0.gguf", tied, lambda _: Q.Q8_0)
    checkpoint = open_checkpoint(tmp_path / "only")  # a directory holding one .gguf file
    assert isinstance(checkpoint, GGUFCheckpoint) and checkpoint.path == path.resolve()
    config = checkpoint.config
    assert (config.architecture, config.name) == ("LlamaForCausalLM", "Tiny-Chat.Q8_0")
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (256, 512, 2)
    assert (config.num_attention_heads, config.num_kv_heads, config.head_dim) == (4, 2, 64)
    assert config.vocab_size == 260
    assert (config.max_position_embeddings, config.rope_theta, config.rope_scaling) == (512, 50000.0, None)
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.tie_word_embeddings, config.eos_token_ids) == (True, (EOS_TOKEN_ID,))
    assert config.torch_dtype is None
    assert not (config.qkv_bias or config.o_proj_bias or config.mlp_bias)
    assert "lm_head.weight" not in _ours(path)
    f16 = write_gguf(tmp_path / "f16.gguf", weights, lambda name: Q.F32 if "norm" in name else Q.F16)
    assert GGUFCheckpoint.open(f16).config.torch_dtype == "float16"
    assert isinstance(open_checkpoint(create_tiny_model(tmp_path / "hf")), SafetensorsCheckpoint)


def test_rope_scaling_from_metadata_and_from_a_llama3_rope_freqs_tensor(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    def linear(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    path = write_gguf(tmp_path / "linear.gguf", weights, edit=linear)
    assert GGUFCheckpoint.open(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # fmt: skip
    base = rope_inverse_frequencies(CONFIG.head_dim, CONFIG.rope_theta, None)
    factors = (base / rope_inverse_frequencies(CONFIG.head_dim, CONFIG.rope_theta, llama3)).numpy()
    for name, rope_freqs in (("llama3", factors), ("other", factors * 1.5)):
        def add_freqs(writer: gguf.GGUFWriter, values: np.ndarray = rope_freqs) -> None:
            writer.add_tensor("rope_freqs.weight", values)

        with_freqs = write_gguf(tmp_path / f"{name}.gguf", weights, edit=add_freqs)
        if name == "llama3":
            assert GGUFCheckpoint.open(with_freqs).config.rope_scaling == llama3
            assert torch.equal(_ours(with_freqs)["norm.weight"], weights["model.norm.weight"])
        else:
            with pytest.raises(ValueError, match="rope_freqs.weight does not match Llama 3's rope scaling"):
                GGUFCheckpoint.open(with_freqs)


def test_refusals_name_what_is_wrong(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    unsupported = write_gguf(
        tmp_path / "iq.gguf", weights, lambda name: Q.IQ4_NL if name.endswith("k_proj.weight") else Q.F32
    )
    with pytest.raises(ValueError, match=r"blk\.0\.attn_k\.weight has type IQ4_NL, which pagewire cannot"):
        _ours(unsupported)

    up = "model.layers.1.mlp.up_proj.weight"
    missing = {name: tensor for name, tensor in weights.items() if name != up}
    missing_up = r"missing \['layers\.1\.mlp\.gate_up_proj\.weight\[up\]'\]; unexpected nothing"
    with pytest.raises(ValueError, match=missing_up):
        _ours(write_gguf(tmp_path / "missing.gguf", missing))

    def add_q_norm(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("blk.0.attn_q_norm.weight", np.ones(64, np.float32))

    extra = write_gguf(tmp_path / "extra.gguf", weights, edit=add_q_norm)
    with pytest.raises(ValueError, match=r"missing nothing; unexpected \['blk\.0\.attn_q_norm\.weight'\]"):
        _ours(extra)

    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma2'"):
        GGUFCheckpoint.open(write_gguf(tmp_path / "gemma.gguf", {}, arch="gemma2"))

    down = "model.layers.0.mlp.down_proj.weight"
    narrow = {**weights, down: weights[down][:128]}
    wrong_shape = r"blk\.0\.ffn_down\.weight .* shape \(128, 512\), expected \(256, 512\)"
    with pytest.raises(ValueError, match=wrong_shape):
        _ours(write_gguf(tmp_path / "narrow.gguf", narrow))

    (tmp_path / "not-gguf.gguf").write_bytes(b"GGML nonsense")
    with pytest.raises(ValueError, match="cannot read .*not-gguf.gguf as a GGUF file"):
        GGUFCheckpoint.open(tmp_path / "not-gguf.gguf")
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        open_checkpoint(tmp_path / "two")
