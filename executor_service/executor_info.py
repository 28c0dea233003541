"""What an executor reports of itself in `Describe`: torch-free, so a simulated executor can report it too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.step_plan import StepPlan, StepResult


class DescribedModel(Protocol):
    """The model facts `Describe` reports (`executor_service.model.ModelConfig` has them all)."""

    name: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MeasuredSpeeds:
    swap_out_bytes_per_second: float
    swap_in_bytes_per_second: float
    prefill_tokens_per_second: float


@dataclass(frozen=True, slots=True)
class DraftModelInfo:
    """The draft model of draft_model speculation: `max_model_drafts` is the most a plan may ask for."""

    name: str
    path: str
    num_layers: int
    max_model_drafts: int


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """Everything `Describe` reports. `dtype` is a torch dtype's name, e.g. "float32"."""

    model_config: DescribedModel
    model_dir: str
    dtype: str
    device_name: str
    ops_backend: str
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    bytes_per_block: int
    speeds: MeasuredSpeeds
    max_num_batched_tokens: int
    max_num_seqs: int
    max_logprobs: int
    max_model_len: int
    # What weights_fingerprint says of the loaded files.
    fingerprint: str = ""
    # LoRA slots on the device (0: LoRA off) and the largest adapter rank a slot holds.
    max_loras: int = 0
    max_lora_rank: int = 0
    draft_model: DraftModelInfo | None = None


class StepRunner(Protocol):
    """Runs plans one at a time against a persistent batch (`ModelRunner`, `SimulatedRunner`)."""

    def execute(self, plan: StepPlan) -> StepResult: ...

    def reset(self) -> None: ...


class LoadedExecutor(Protocol):
    """What the servicer serves: a runner, the facts `Describe` reports, and a way to let go."""

    runner: StepRunner
    info: ExecutorInfo

    def close(self) -> None: ...
