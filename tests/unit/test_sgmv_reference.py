"""The torch SGMV reference against PEFT-style LoRA layers applied one adapter segment at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_ops import TorchOps

IN_FEATURES, OUT_FEATURES, RANK, NUM_SLOTS = 48, 40, 8, 4


def random_adapters(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked `lora_A.weight` [slots, rank, in] and `lora_B.weight` [slots, out, rank]."""
    lora_a = torch.randn(NUM_SLOTS, RANK, IN_FEATURES, generator=generator)
    lora_b = torch.randn(NUM_SLOTS, OUT_FEATURES, RANK, generator=generator)
    return lora_a, lora_b


def peft_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """What a PEFT `LoraLayer` adds to its base layer's output: lora_B(lora_A(x)) * scaling."""
    down = nn.Linear(lora_a.shape[1], lora_a.shape[0], bias=False)
    up = nn.Linear(lora_b.shape[1], lora_b.shape[0], bias=False)
    with torch.no_grad():
        down.weight.copy_(lora_a)
        up.weight.copy_(lora_b)
        return up(down(x)) * scaling


def apply_lora(
    x: torch.Tensor,
    base: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: SgmvSegments,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shrink output, base + expand) through the reference ops; `base` is not modified."""
    ops = TorchOps()
    shrunk = torch.full((x.shape[0], RANK), float("nan"))
    ops.sgmv_shrink(x, lora_a, shrunk, segments, scale)
    out = base.clone()
    ops.sgmv_expand(shrunk, lora_b, out, segments)
    return shrunk, out


def test_each_segment_gets_its_own_adapter():
    generator = torch.Generator().manual_seed(0)
    lora_a, lora_b = random_adapters(generator)
    starts, slots = [0, 3, 4, 9, 11], [2, 0, 3, 2]
    x = torch.randn(11, IN_FEATURES, generator=generator)
    base = torch.randn(11, OUT_FEATURES, generator=generator)
    scale = 16 / RANK
    shrunk, out = apply_lora(x, base, lora_a, lora_b, SgmvSegments.build(starts, slots), scale)
    for begin, end, slot in zip(starts[:-1], starts[1:], slots, strict=True):
        expected_down = x[begin:end] @ lora_a[slot].T * scale
        torch.testing.assert_close(shrunk[begin:end], expected_down, rtol=1e-5, atol=1e-5)
        expected = base[begin:end] + peft_delta(x[begin:end], lora_a[slot], lora_b[slot], scale)
        torch.testing.assert_close(out[begin:end], expected, rtol=1e-5, atol=1e-4)


def test_rows_without_an_adapter_are_zero_after_shrink_and_untouched_by_expand():
    generator = torch.Generator().manual_seed(1)
    lora_a, lora_b = random_adapters(generator)
    # Rows 0-1 precede the first segment, 2-4 use no adapter, 5-6 use slot 1, 7-8 follow the last.
    segments = SgmvSegments.build([2, 5, 7], [-1, 1])
    x = torch.randn(9, IN_FEATURES, generator=generator)
    base = torch.randn(9, OUT_FEATURES, generator=generator)
    shrunk, out = apply_lora(x, base, lora_a, lora_b, segments, 0.5)
    untouched = [0, 1, 2, 3, 4, 7, 8]
    assert torch.equal(shrunk[untouched], torch.zeros(len(untouched), RANK))
    assert torch.equal(out[untouched], base[untouched])
    expected = base[5:7] + peft_delta(x[5:7], lora_a[1], lora_b[1], 0.5)
    torch.testing.assert_close(out[5:7], expected, rtol=1e-5, atol=1e-4)


def test_expand_into_a_column_slice_leaves_the_other_columns_alone():
    generator = torch.Generator().manual_seed(2)
    lora_a, lora_b = random_adapters(generator)
    segments = SgmvSegments.build([0, 2, 5], [3, 0])
    v = torch.randn(5, RANK, generator=generator)
    fused = torch.randn(5, 10 + OUT_FEATURES + 6, generator=generator)
    original = fused.clone()
    TorchOps().sgmv_expand(v, lora_b, fused[:, 10 : 10 + OUT_FEATURES], segments)
    assert torch.equal(fused[:, :10], original[:, :10])
    assert torch.equal(fused[:, 10 + OUT_FEATURES :], original[:, 10 + OUT_FEATURES :])
    expected = original[:, 10 : 10 + OUT_FEATURES].clone()
    expected[0:2] += v[0:2] @ lora_b[3].T
    expected[2:5] += v[2:5] @ lora_b[0].T
    torch.testing.assert_close(fused[:, 10 : 10 + OUT_FEATURES], expected, rtol=1e-6, atol=1e-5)


def test_bfloat16_output_is_the_float32_sum_rounded_once():
    generator = torch.Generator().manual_seed(3)
    _, lora_b = random_adapters(generator)
    segments = SgmvSegments.build([0, 4], [2])
    v = torch.randn(4, RANK, generator=generator)
    out = torch.randn(4, OUT_FEATURES, generator=generator).to(torch.bfloat16)
    expected = (out.float() + v @ lora_b[2].to(torch.bfloat16).float().T).to(torch.bfloat16)
    TorchOps().sgmv_expand(v, lora_b.to(torch.bfloat16), out, segments)
    assert torch.equal(out, expected)


def test_shrink_rejects_a_slot_past_the_stacked_adapters():
    lora_a, _ = random_adapters(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="slot 4"):
        TorchOps().sgmv_shrink(
            torch.zeros(2, IN_FEATURES), lora_a, torch.zeros(2, RANK), SgmvSegments.build([0, 2], [4]), 1.0
        )


def test_shrink_rejects_segments_past_the_batch_and_a_non_float32_out():
    lora_a, _ = random_adapters(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="end at row 3"):
        TorchOps().sgmv_shrink(
            torch.zeros(2, IN_FEATURES), lora_a, torch.zeros(2, RANK), SgmvSegments.build([0, 3], [0]), 1.0
        )
    with pytest.raises(ValueError, match="float32"):
        TorchOps().sgmv_shrink(
            torch.zeros(2, IN_FEATURES),
            lora_a,
            torch.zeros(2, RANK, dtype=torch.bfloat16),
            SgmvSegments.build([0, 2], [0]),
            1.0,
        )


def test_expand_rejects_mismatched_rank():
    _, lora_b = random_adapters(torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="disagree"):
        TorchOps().sgmv_expand(
            torch.zeros(2, RANK + 1), lora_b, torch.zeros(2, OUT_FEATURES), SgmvSegments.build([0, 2], [0])
        )


def test_segments_must_be_ordered_and_match_their_slots():
    with pytest.raises(ValueError, match="non-decreasing"):
        SgmvSegments.build([0, 4, 2], [0, 1])
    with pytest.raises(ValueError, match="len"):
        SgmvSegments.build([0, 4], [0, 1])
    segments = SgmvSegments.build([1, 4, 4, 6], [0, 2, -1])
    assert segments.num_segments == 3
    assert segments.max_segment_len == 3
    assert segments.rows(1) == slice(4, 4)
    assert segments.starts.dtype == torch.int32 and segments.starts.tolist() == [1, 4, 4, 6]
