"""How a preempted sequence leaves the device: swap its K/V to host memory or drop it and recompute later."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PreemptionMode(enum.Enum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass(frozen=True, slots=True)
class TransferSpeeds:
    """What the executor measured at start-up (its `Describe`), the inputs of the cost estimates."""

    bytes_per_block: int
    swap_out_bytes_per_second: float
    swap_in_bytes_per_second: float
    prefill_tokens_per_second: float


@dataclass(frozen=True, slots=True)
class PreemptionDecision:
    """The chosen mode, both estimates in seconds (None where unknown) and why, for the log."""

    mode: PreemptionMode
    swap_seconds: float | None
    recompute_seconds: float | None
    reason: str


class PreemptionPolicy:
    """Chooses swap or recompute for one victim.

    `recompute` always recomputes. `swap` swaps whenever the host pool has room. `auto` compares
    swap ~ KV bytes / swap-out speed + KV bytes / swap-in speed (out now, back in later) with
    recompute ~ tokens to compute again / prefill speed, and takes the cheaper (recompute on a tie: it
    holds no host memory). Every mode recomputes when the host pool is too small for the victim.
    """

    def __init__(self, mode: str, speeds: TransferSpeeds | None = None) -> None:
        if mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption mode {mode!r} is not supported; use one of {', '.join(PREEMPTION_MODES)}"
            )
        if mode == "auto" and speeds is None:
            raise ValueError("preemption mode 'auto' needs the executor's measured speeds to compare costs")
        self.mode = mode
        self.speeds = speeds

    def swap_seconds(self, num_blocks: int) -> float | None:
        speeds = self.speeds
        if speeds is None:
            return None
        if speeds.swap_out_bytes_per_second <= 0 or speeds.swap_in_bytes_per_second <= 0:
            return math.inf
        num_bytes = num_blocks * speeds.bytes_per_block
        return num_bytes / speeds.swap_out_bytes_per_second + num_bytes / speeds.swap_in_bytes_per_second

    def recompute_seconds(self, num_tokens: int) -> float | None:
        speeds = self.speeds
        if speeds is None:
            return None
        if speeds.prefill_tokens_per_second <= 0:
            return math.inf
        return num_tokens / speeds.prefill_tokens_per_second

    def choose(
        self, *, num_blocks: int, num_tokens_to_recompute: int, num_free_host_blocks: int
    ) -> PreemptionDecision:
        """`num_blocks`: device blocks holding the victim's computed K/V (what a swap moves);
        `num_tokens_to_recompute`: tokens a recompute computes again (those the prefix cache will
        still hold excluded)."""
        swap_seconds = self.swap_seconds(num_blocks)
        recompute_seconds = self.recompute_seconds(num_tokens_to_recompute)

        def decide(mode: PreemptionMode, reason: str) -> PreemptionDecision:
            return PreemptionDecision(mode, swap_seconds, recompute_seconds, reason)

        if self.mode == "recompute":
            return decide(PreemptionMode.RECOMPUTE, "preemption mode recompute")
        if num_blocks > num_free_host_blocks:
            reason = f"host pool full ({num_free_host_blocks} free, {num_blocks} needed)"
            return decide(PreemptionMode.RECOMPUTE, reason)
        if self.mode == "swap":
            return decide(PreemptionMode.SWAP, "preemption mode swap")
        assert swap_seconds is not None and recompute_seconds is not None
        if swap_seconds < recompute_seconds:
            return decide(PreemptionMode.SWAP, "swap is cheaper")
        return decide(PreemptionMode.RECOMPUTE, "recompute is not dearer")
