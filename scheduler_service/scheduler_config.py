"""The scheduler's limits: batch size in sequences and tokens, sequence length and the KV pool's geometry."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_service.preemption_policy import PREEMPTION_MODES, TransferSpeeds


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Validated on construction: a ValueError names the setting to change.

    `max_num_batched_tokens >= max_num_seqs`, so a step always has room for every running decode.

    The pool must hold one sequence of `max_model_len` tokens on its own: with that, the sequence a
    step keeps after preempting every later arrival always fits, so scheduling never livelocks
    (request validation guarantees prompt + max_tokens <= max_model_len).

    `num_host_blocks` is the executor's swap pool (0: never swap). `preemption_mode` is auto, recompute
    or swap (see PreemptionPolicy); auto needs the executor's `transfer_speeds`.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int
    block_size: int
    num_device_blocks: int
    num_host_blocks: int = 0
    preemption_mode: str = "recompute"
    transfer_speeds: TransferSpeeds | None = None
    # The executor's LoRA slots (0: LoRA off); a step holds at most this many distinct adapters.
    max_loras: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "block_size",
            "num_device_blocks",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_loras < 0:
            raise ValueError(f"max_loras must be >= 0, got {self.max_loras}")
        if self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode {self.preemption_mode!r} is not supported; use one of "
                f"{', '.join(PREEMPTION_MODES)}"
            )
        if self.preemption_mode == "auto" and self.transfer_speeds is None:
            raise ValueError(
                "preemption_mode 'auto' compares measured costs; pass the executor's transfer_speeds "
                "or choose recompute or swap"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                f"{self.max_num_seqs}; raise it (or lower max_num_seqs) so every running sequence can "
                "decode in every step"
            )
        if self.num_device_blocks < self.max_num_blocks_per_seq:
            raise ValueError(
                f"the KV pool of {self.num_device_blocks} blocks x {self.block_size} tokens cannot hold one "
                f"sequence of max_model_len={self.max_model_len} tokens ({self.max_num_blocks_per_seq} "
                "blocks); give the executor more KV cache memory or lower max_model_len"
            )

    @property
    def max_num_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
