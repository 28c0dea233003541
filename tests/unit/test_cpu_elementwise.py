"""The CPU backend's RMSNorm and rotary kernels against the torch reference (OpsBackend's defaults)."""

from __future__ import annotations

import pytest
import torch

from executor_service.model.rope import RotaryEmbedding
from executor_service.ops.torch_ops import TorchOps

REFERENCE = TorchOps()


@pytest.mark.parametrize("num_rows", [1, 3, 17, 300])
@pytest.mark.parametrize("hidden", [64, 52, 576])
def test_rms_norm_matches_the_reference(cpu_ops, num_rows, hidden):
    generator = torch.Generator().manual_seed(num_rows * hidden)
    x = torch.randn(num_rows, hidden, generator=generator) * 3
    weight = torch.randn(hidden, generator=generator)
    got = cpu_ops.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, REFERENCE.rms_norm(x, weight, 1e-5), rtol=2e-6, atol=2e-6)
    assert got.shape == (num_rows, hidden) and got.data_ptr() != x.data_ptr()


def test_rms_norm_of_a_row_does_not_depend_on_the_batch(cpu_ops):
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(576, generator=torch.Generator().manual_seed(2))
    batched = cpu_ops.rms_norm(x, weight, 1e-5)
    for row in (0, 17, 39):
        assert torch.equal(cpu_ops.rms_norm(x[row : row + 1], weight, 1e-5)[0], batched[row])
    assert torch.equal(cpu_ops.rms_norm(x[5:23], weight, 1e-5), batched[5:23])


@pytest.mark.parametrize("num_tokens", [1, 5, 130])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 4, 64), (9, 3, 64), (4, 4, 12)])
def test_rotary_rotates_views_of_the_fused_projection_in_place(
    cpu_ops, num_tokens, num_heads, num_kv_heads, head_dim
):
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None)
    generator = torch.Generator().manual_seed(num_tokens + num_heads)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=generator)
    v_before = qkv[:, q_size + kv_size :].clone()
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 512, (num_tokens,), generator=generator)
    want_q, want_k = REFERENCE.rotary_embedding(positions, q, k, rotary.cos, rotary.sin)
    got_q, got_k = cpu_ops.rotary_embedding(positions, q, k, rotary.cos, rotary.sin)
    assert got_q.data_ptr() == qkv.data_ptr()  # in place, in the fused projection's buffer
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)


def test_rotary_refuses_a_position_outside_the_table(cpu_ops):
    rotary = RotaryEmbedding(64, 16, 10000.0, None)
    q, k = torch.randn(2, 2, 64), torch.randn(2, 1, 64)
    with pytest.raises(RuntimeError, match="out of the rotary table"):
        cpu_ops.rotary_embedding(torch.tensor([3, 16]), q, k, rotary.cos, rotary.sin)


def test_other_dtypes_take_the_reference(cpu_ops):
    x = torch.randn(4, 64, dtype=torch.float64)
    weight = torch.randn(64, dtype=torch.float64)
    assert torch.equal(cpu_ops.rms_norm(x, weight, 1e-6), REFERENCE.rms_norm(x, weight, 1e-6))
    rotary = RotaryEmbedding(64, 32, 10000.0, None)
    q, k = torch.randn(3, 2, 64, dtype=torch.bfloat16), torch.randn(3, 1, 64, dtype=torch.bfloat16)
    positions = torch.tensor([0, 5, 31])
    got = cpu_ops.rotary_embedding(positions, q, k, rotary.cos, rotary.sin)
    want = REFERENCE.rotary_embedding(positions, q, k, rotary.cos, rotary.sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[0].data_ptr() != q.data_ptr()
