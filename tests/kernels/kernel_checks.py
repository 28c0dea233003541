"""Where the kernel suite runs (a CUDA device, or the host emulator on the CPU) and how it judges outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor_service.ops.cuda_ops import CudaOps


@dataclass(frozen=True)
class KernelTarget:
    """`ops` launches the real kernels: on a GPU through CuPy, or on the CPU through the emulator.

    `num_sms` is what the launch planner sees; the emulator claims an H100's 132 so that both targets
    take the same split/unsplit paths for the same shapes.
    """

    name: str
    device: torch.device
    ops: CudaOps
    num_sms: int

    def num_kernel_launches(self) -> int | None:
        """Kernels launched so far on the emulator; None on a GPU (CuPy does not count them)."""
        return getattr(self.ops.runtime, "num_launches", None)

    def assert_launched(self, since: int | None, expected: bool = True) -> None:
        """That kernels were launched (or, `expected=False`, none was) after `since` was read."""
        now = self.num_kernel_launches()
        if since is not None and now is not None:
            assert (now > since) == expected, (
                f"{now - since} kernel launches, expected {'some' if expected else 'none'}"
            )

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def host_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as host memory the kernels can address: pinned on a GPU, plain on the emulator."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def poison_allocator(self, sizes_in_bytes: list[int]) -> None:
        """Leaves freed blocks of these sizes filled with 0xFF (NaN in fp32, fp16 and bf16), so the next
        `torch.empty` of a matching size hands out NaN: an output element a kernel forgets to write then
        fails the comparison instead of passing by luck. Exact with torch's CUDA caching allocator; on
        the CPU it is best effort (malloc usually, not always, hands a freed block back)."""
        blocks = [
            torch.empty(size, dtype=torch.uint8, device=self.device).fill_(0xFF) for size in sizes_in_bytes
        ]
        self.synchronize()
        del blocks


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere makes it NaN (and fail any bound)."""
    difference = (actual.double().cpu() - expected.double().cpu()).norm()
    return float(difference / expected.double().cpu().norm().clamp_min(1e-30))


# ‖out − ref‖/‖ref‖ bounds for outputs stored in each dtype (fp32 accumulation in both).
RELATIVE_BOUNDS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
