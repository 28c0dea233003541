"""`y = x W^T + b` whose every output row is bitwise independent of the other rows in the call.

MKL's sgemm (what `F.linear` runs on CPU) picks its kernel and its split of the reduction across
threads by the number of rows M: the same row comes out differently at M = 1, 2..15 and 16+, and with
2 threads also at M around 57 and 200 for K = 1408 (measured with torch 2.13 / MKL 2024.2). oneDNN's
matmul gives the same bits for a row at every M >= 2 and any position in the batch (measured for all
M in 1..69 and 100..2048, K and N of the bench model and SmolLM2-135M), so on CPU in float32 this
runs through oneDNN with a single row padded to two. The weight may be given pre-packed into oneDNN's
blocked layout (`pack_weight`): about 10% faster, and bitwise the same result.
tests/unit/test_batch_invariance.py checks the property on this machine's kernels. Other devices and
dtypes use `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available()


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether `invariant_linear` runs this weight through oneDNN (CPU, float32)."""
    return _ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` `[out, in]` reordered for oneDNN's matmul; only for weights where `uses_onednn`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias) (+ residual)` for 2-D `x` `[M, K]`, batch-invariant per row on CPU
    float32; `residual` `[M, N]` is added inside oneDNN's matmul (a post-op: no second pass over the
    output).

    `packed`, if given, is `pack_weight(weight)` for the current contents of `weight`.
    """
    if not _runs_onednn(x, weight):
        out = F.linear(x, weight, bias)
        return out if residual is None else out + residual
    w = weight if packed is None else packed
    x, residual, rows = _two_rows_at_least(x, residual)
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")[:rows]
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), w, bias, "add")[:rows]


def silu_gate_times_up(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    gate_packed: torch.Tensor | None = None,
    up_packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU's `silu(x Wg^T) * (x Wu^T)` for the fused `gate_up_weight` `[2I, K]` (gate rows first).

    On CPU float32 it is two oneDNN matmuls with the activation and the product as post-ops (silu on
    the gate's output, times the gate on the up's), so neither the `[M, 2I]` product nor a silu pass
    is materialised; batch-invariant per row like `invariant_linear`. `gate_packed` / `up_packed` are
    `pack_weight` of the two halves. Elsewhere: `F.linear`, split, `F.silu(gate) * up`.
    """
    intermediate = gate_up_weight.shape[0] // 2
    if not _runs_onednn(x, gate_up_weight):
        gate, up = F.linear(x, gate_up_weight).split(intermediate, dim=-1)
        return F.silu(gate) * up
    gate_w = gate_up_weight[:intermediate] if gate_packed is None else gate_packed
    up_w = gate_up_weight[intermediate:] if up_packed is None else up_packed
    x, _, rows = _two_rows_at_least(x, None)
    gate = torch.ops.mkldnn._linear_pointwise(x, gate_w, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, up_w, None, "mul")[:rows]


def _runs_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return uses_onednn(weight) and x.dtype == torch.float32 and x.dim() == 2


def _two_rows_at_least(
    x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A single row padded to two (oneDNN's one-row kernel rounds differently); the real row count."""
    rows = x.shape[0]
    if rows != 1:
        return x, residual, rows
    return x.expand(2, -1), None if residual is None else residual.expand(2, -1).contiguous(), rows
