"""The per-iteration contract as domain types: what the scheduler asks for and what the executor answers.

These are the plain-Python twins of `protos/pagewire/v1/executor.proto`; `plan_codec` converts between
the two so that neither the scheduler policy nor the executor runner ever sees a protobuf class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

SequenceId = NewType("SequenceId", int)
BlockId = NewType("BlockId", int)


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """What the executor's sampler needs of a request's sampling parameters.

    Neutral values disable each transform: temperature 0 is greedy, top_p 1, top_k -1 (or 0),
    min_p 0, repetition_penalty 1, presence and frequency penalties 0.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # None: no logprobs; N >= 0: the chosen token's logprob plus the top-N.
    logprobs: int | None = None
    min_tokens: int = 0
    banned_token_ids_before_min_tokens: tuple[int, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class BlockPairs:
    """(src, dst) block-id pairs as two parallel tuples of equal length."""

    src_block_ids: tuple[int, ...] = ()
    dst_block_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert len(self.src_block_ids) == len(self.dst_block_ids), "src and dst lengths differ"

    def __len__(self) -> int:
        return len(self.src_block_ids)

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.src_block_ids, self.dst_block_ids))

    @classmethod
    def of(cls, pairs: list[tuple[int, int]]) -> BlockPairs:
        return cls(tuple(src for src, _ in pairs), tuple(dst for _, dst in pairs))


@dataclass(frozen=True, slots=True)
class AdapterLoad:
    """Load a LoRA adapter into an executor slot (reserved for LoRA)."""

    slot: int
    adapter_name: str
    adapter_path: str


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence in full, sent once (again after preemption).

    `token_ids` holds the prompt followed by any output tokens already streamed to the client;
    the first `num_computed_tokens` of them already have K/V in `block_ids`.
    """

    sequence_id: SequenceId
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: tuple[int, ...]
    num_scheduled_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    lora_slot: int | None = None


@dataclass(frozen=True, slots=True)
class ContinuedSequence:
    """The change to a sequence the executor holds: tokens to compute and blocks appended.

    Speculative decoding: `draft_token_ids` (proposed by the scheduler) or `num_model_drafts` (to be
    proposed by the executor's draft model), never both, follow the known tokens and are verified this
    step; `num_scheduled_tokens` counts them."""

    sequence_id: SequenceId
    num_scheduled_tokens: int
    new_block_ids: tuple[int, ...] = ()
    draft_token_ids: tuple[int, ...] = ()
    num_model_drafts: int = 0


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One iteration, delta-encoded against the previous plan on the same stream.

    Execution order on the executor: drop finished and preempted sequences, swap_out, swap_in, copy,
    add new sequences, update continued ones, one forward over every scheduled token, sample each
    sequence whose computed tokens reach the end of its known tokens.
    """

    step_id: int
    new_sequences: tuple[NewSequence, ...] = ()
    continued_sequences: tuple[ContinuedSequence, ...] = ()
    finished_sequence_ids: tuple[int, ...] = ()
    preempted_sequence_ids: tuple[int, ...] = ()
    swap_out: BlockPairs = field(default_factory=BlockPairs)
    swap_in: BlockPairs = field(default_factory=BlockPairs)
    copy: BlockPairs = field(default_factory=BlockPairs)
    adapter_loads: tuple[AdapterLoad, ...] = ()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.new_sequences) + sum(
            s.num_scheduled_tokens for s in self.continued_sequences
        )


@dataclass(frozen=True, slots=True)
class SequenceOutput:
    """What one sequence produced in a step: zero tokens for a non-final prefill chunk."""

    sequence_id: SequenceId
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    # For each sampled token, the top-N (token id, logprob) pairs, most likely first.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    # The draft model's drafts this step verified (`num_model_drafts` of them); the first
    # len(token_ids) - 1 were accepted. Empty for drafts the scheduler proposed.
    draft_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StepTiming:
    """Where the executor spent one step, in seconds."""

    total_seconds: float = 0.0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0
    block_ops_seconds: float = 0.0
    num_tokens: int = 0
    # The draft model's forward and draft steps (not part of forward_seconds).
    draft_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class StepError:
    """A rejected plan: a grpc.StatusCode value (its integer) and what was wrong; `adapter_slot` when
    the adapter the plan loads into that slot could not be read."""

    code: int
    message: str
    adapter_slot: int | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """The answer to one StepPlan: outputs in plan order (new, then continued), or an error."""

    step_id: int
    outputs: tuple[SequenceOutput, ...] = ()
    timing: StepTiming = field(default_factory=StepTiming)
    error: StepError | None = None
