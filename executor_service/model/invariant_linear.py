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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for 2-D `x` `[M, K]`, batch-invariant per row on CPU float32.

    `packed`, if given, is `pack_weight(weight)` for the current contents of `weight`.
    """
    if not (uses_onednn(weight) and x.dtype == torch.float32 and x.dim() == 2):
        return F.linear(x, weight, bias)
    w = weight if packed is None else packed
    if x.shape[0] == 1:
        return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), w, bias, "none", [], "")[:1]
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
