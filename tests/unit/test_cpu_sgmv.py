"""The CPU SGMV kernels against the torch reference: mixed ranks padded, slot -1 segments, rows outside
every segment, column-slice outs, AVX2 and generic shapes; and each row bitwise independent of its batch."""

from __future__ import annotations

import pytest
import torch

from executor_service.ops.cpu_kernel_build import CpuKernelUnavailable
from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_ops import TorchOps


@pytest.fixture(scope="module")
def cpu_ops():
    from executor_service.ops.cpu_ops import CpuOps

    try:
        ops = CpuOps()
    except CpuKernelUnavailable as error:
        pytest.skip(str(error))
    ops.prepare_lora()
    if ops._sgmv is None:
        pytest.skip("the CPU SGMV kernel did not build")
    return ops


def padded_slots(
    generator: torch.Generator, ranks: list[int], rank_max: int, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked A [slots, rank_max, in] and B [slots, out, rank_max], zero past each slot's rank (as
    `LoraSlots` holds them); a rank of 0 is an empty slot."""
    lora_a = torch.zeros(len(ranks), rank_max, in_features)
    lora_b = torch.zeros(len(ranks), out_features, rank_max)
    for slot, rank in enumerate(ranks):
        lora_a[slot, :rank] = torch.randn(rank, in_features, generator=generator)
        lora_b[slot, :, :rank] = torch.randn(out_features, rank, generator=generator)
    return lora_a, lora_b


def run_both(ops, x, lora_a, lora_b, base, segments, scale, out_columns=None):
    """(shrunk, out) from `ops`; `out_columns` (start, stop) expands into a column slice of a wider out."""
    shrunk = torch.full((x.shape[0], lora_a.shape[1]), float("nan"))
    ops.sgmv_shrink(x, lora_a, shrunk, segments, scale)
    out = base.clone()
    target = out if out_columns is None else out[:, out_columns[0]:out_columns[1]]
    ops.sgmv_expand(shrunk, lora_b, target, segments)
    return shrunk, out


CASES = {
    # (in, out, rank_max, ranks per slot, starts, slots): AVX2 shapes (in % 16, rank % 8) first.
    "decode_rows_interleaved": (
        64, 48, 16, [16, 4, 8, 0], list(range(13)), [0, 1, 2, 0, 1, 2, 0, -1, 1, 2, 1, 0]
    ),
    "prefill_and_decodes": (64, 40, 16, [16, 2, 8, 16], [0, 37, 38, 39, 60, 61], [3, 1, -1, 0, 2]),
    "rows_outside_segments": (48, 24, 8, [8, 3], [2, 5, 7, 9], [-1, 1, 0]),
    "generic_shapes": (50, 33, 6, [6, 1, 5], [0, 4, 9, 10, 17], [2, 0, -1, 1]),
    "long_segment_parallel": (512, 96, 16, [16, 12], [0, 300, 700], [1, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_the_reference(cpu_ops, case):
    in_features, out_features, rank_max, ranks, starts, slots = CASES[case]
    generator = torch.Generator().manual_seed(len(case))
    lora_a, lora_b = padded_slots(generator, ranks, rank_max, in_features, out_features)
    num_rows = starts[-1] + 2
    x = torch.randn(num_rows, in_features, generator=generator)
    base = torch.randn(num_rows, out_features, generator=generator)
    segments = SgmvSegments.build(starts, slots)
    shrunk, out = run_both(cpu_ops, x, lora_a, lora_b, base, segments, 0.75)
    ref_shrunk, ref_out = run_both(TorchOps(), x, lora_a, lora_b, base, segments, 0.75)
    torch.testing.assert_close(shrunk, ref_shrunk, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-4)
    adapter_rows = torch.zeros(num_rows, dtype=torch.bool)
    for begin, end, slot in zip(starts, starts[1:], slots, strict=False):
        adapter_rows[begin:end] = slot >= 0 and ranks[slot] > 0
    assert torch.equal(shrunk[~adapter_rows], torch.zeros(int((~adapter_rows).sum()), rank_max))
    assert torch.equal(out[~adapter_rows], base[~adapter_rows])


def test_expand_into_a_column_slice_touches_only_its_columns(cpu_ops):
    generator = torch.Generator().manual_seed(7)
    lora_a, lora_b = padded_slots(generator, [16, 8], 16, 64, 32)
    x = torch.randn(6, 64, generator=generator)
    fused = torch.randn(6, 96, generator=generator)  # q | k | v, the slice is the middle 32 columns
    segments = SgmvSegments.build([0, 2, 3, 6], [1, -1, 0])
    _, out = run_both(cpu_ops, x, lora_a, lora_b, fused, segments, 1.0, out_columns=(32, 64))
    _, ref_out = run_both(TorchOps(), x, lora_a, lora_b, fused, segments, 1.0, out_columns=(32, 64))
    assert torch.equal(out[:, :32], fused[:, :32]) and torch.equal(out[:, 64:], fused[:, 64:])
    assert torch.equal(out[2], fused[2])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-4)


def test_a_row_is_bitwise_the_same_alone_and_in_any_batch(cpu_ops):
    generator = torch.Generator().manual_seed(11)
    lora_a, lora_b = padded_slots(generator, [16, 16, 16], 16, 512, 1408)
    x = torch.randn(200, 512, generator=generator)
    base = torch.randn(200, 1408, generator=generator)
    segments = SgmvSegments.build([0, 90, 150, 200], [0, 2, 1])
    batched = run_both(cpu_ops, x, lora_a, lora_b, base, segments, 1.0)
    alone = run_both(
        cpu_ops, x[120:121], lora_a, lora_b, base[120:121], SgmvSegments.build([0, 1], [2]), 1.0
    )
    assert torch.equal(batched[0][120], alone[0][0]) and torch.equal(batched[1][120], alone[1][0])


def test_other_dtypes_fall_back_to_the_reference(cpu_ops):
    generator = torch.Generator().manual_seed(5)
    lora_a, lora_b = (t.to(torch.bfloat16) for t in padded_slots(generator, [8], 8, 32, 16))
    x = torch.randn(4, 32, generator=generator).to(torch.bfloat16)
    base = torch.randn(4, 16, generator=generator).to(torch.bfloat16)
    segments = SgmvSegments.build([0, 4], [0])
    shrunk, out = run_both(cpu_ops, x, lora_a, lora_b, base, segments, 2.0)
    ref_shrunk, ref_out = run_both(TorchOps(), x, lora_a, lora_b, base, segments, 2.0)
    assert torch.equal(shrunk, ref_shrunk) and torch.equal(out, ref_out)


def test_bad_arguments_are_refused_before_the_kernel(cpu_ops):
    x, lora_a, out = torch.zeros(4, 32), torch.zeros(2, 8, 32), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="slot 2"):
        cpu_ops.sgmv_shrink(x, lora_a, out, SgmvSegments.build([0, 4], [2]), 1.0)
    with pytest.raises(ValueError, match="segments end at row 5"):
        cpu_ops.sgmv_shrink(x, lora_a, out, SgmvSegments.build([0, 5], [0]), 1.0)
    with pytest.raises(ValueError, match="shapes disagree"):
        cpu_ops.sgmv_expand(out, torch.zeros(2, 16, 4), torch.zeros(4, 16), SgmvSegments.build([0, 4], [0]))
    with pytest.raises(ValueError, match="float32 out"):
        cpu_ops.sgmv_shrink(x, lora_a, out.double(), SgmvSegments.build([0, 4], [0]), 1.0)
