"""Per-step time outside the model forward, and plan bytes per step, at a given number of running decodes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.engine_probe import StepSample
from benchmarks.workloads import BenchRequest, LengthRange, random_requests
from executor_service.input_builder import build_model_input
from executor_service.persistent_batch import ScheduledSequence, SequenceState
from shared.plan_codec import plan_to_pb
from shared.step_plan import SamplingOptions, SequenceId

PROMPT_LEN = 32
OUTPUT_LEN = 16
# The first decode steps after the prefills still pay one-off costs (allocator growth, caches).
NUM_WARMUP_DECODE_STEPS = 2
INPUT_PREP_REPEATS = 30


@dataclass(frozen=True, slots=True)
class OverheadPoint:
    """Medians over the decode-only steps with exactly `num_running` sequences, in milliseconds.

    outside_forward = wall - (executor forward - input preparation): the executor's forward timing
    includes building the step's input tensors, which is overhead, so that part (measured in-process on
    the same batch shape) is moved out. It splits into work on the executor (sampling; executor other:
    plan validation, persistent batch update, result building; input preparation) and the executor's
    idle time (wall - executor total: waiting for the next plan, i.e. plan and result encoding, gRPC,
    decoding and whatever scheduler work plans in flight did not hide). `scheduler_ms` is the engine's
    own CPU time per step (schedule, apply, stop checks, detokenization, client deltas); with plans in
    flight it overlaps the forward, so it is not a part of outside_forward.
    """

    num_running: int
    num_steps: int
    wall_ms: float
    forward_ms: float
    outside_forward_ms: float
    sampling_ms: float
    executor_other_ms: float
    input_prep_ms: float
    executor_idle_ms: float
    scheduler_ms: float
    plan_encode_ms: float
    plan_bytes: int


def overhead_requests(num_running: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    """`num_running` short prompts that decode together for OUTPUT_LEN steps."""
    return random_requests(
        num_running,
        LengthRange(PROMPT_LEN, PROMPT_LEN),
        LengthRange(OUTPUT_LEN, OUTPUT_LEN),
        vocab_size,
        seed,
    )


def measure_input_prep(
    num_seqs: int, context_len: int, block_size: int, repeats: int = INPUT_PREP_REPEATS
) -> float:
    """Median seconds of the executor's `build_model_input` for `num_seqs` decodes at `context_len`."""
    num_blocks = -(-(context_len + 1) // block_size)
    scheduled = [
        ScheduledSequence(
            state=SequenceState(
                sequence_id=SequenceId(i),
                token_ids=list(range(context_len + 1)),
                num_prompt_tokens=PROMPT_LEN,
                num_computed_tokens=context_len,
                block_ids=list(range(i * num_blocks, (i + 1) * num_blocks)),
                sampling=SamplingOptions(),
                lora_slot=None,
            ),
            start=context_len,
            num_tokens=1,
        )
        for i in range(num_seqs)
    ]
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        build_model_input(scheduled, block_size, torch.device("cpu"))
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _plan_encode_seconds(samples: Sequence[StepSample]) -> float:
    timings = []
    for sample in samples:
        started = time.perf_counter()
        plan_to_pb(sample.plan).SerializeToString()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def summarize_overhead(samples: Sequence[StepSample], num_running: int, block_size: int) -> OverheadPoint:
    """The decode-only steps with `num_running` sequences, past the first NUM_WARMUP_DECODE_STEPS."""
    steps = [s for s in samples if s.is_decode_only and s.num_continued_sequences == num_running]
    steps = steps[NUM_WARMUP_DECODE_STEPS:] or steps
    if not steps:
        raise RuntimeError(f"no decode-only step ran with {num_running} sequences")
    context_len = PROMPT_LEN + OUTPUT_LEN // 2
    input_prep = measure_input_prep(num_running, context_len, block_size)

    def median(values: Sequence[float]) -> float:
        return 1e3 * statistics.median(values)

    forward = median([s.forward_s for s in steps]) - 1e3 * input_prep
    wall = median([s.wall_s for s in steps])
    return OverheadPoint(
        num_running=num_running,
        num_steps=len(steps),
        wall_ms=wall,
        forward_ms=forward,
        outside_forward_ms=median([s.wall_s - s.forward_s for s in steps]) + 1e3 * input_prep,
        sampling_ms=median([s.sample_s for s in steps]),
        executor_other_ms=median([s.executor_s - s.forward_s - s.sample_s for s in steps]),
        input_prep_ms=1e3 * input_prep,
        executor_idle_ms=median([s.wall_s - s.executor_s for s in steps]),
        scheduler_ms=median([s.scheduler_s for s in steps]),
        plan_encode_ms=1e3 * _plan_encode_seconds(steps),
        plan_bytes=int(statistics.median(s.plan_bytes for s in steps)),
    )
