"""KV memory efficiency and per-step overhead, computed from known engine steps."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.engine_probe import StepSample
from benchmarks.kv_memory import contiguous_capacity, kv_waste, paged_capacity
from benchmarks.overhead import NUM_WARMUP_DECODE_STEPS, measure_input_prep, summarize_overhead
from shared.plan_codec import plan_to_pb
from shared.step_plan import ContinuedSequence, SequenceId, StepPlan

BASE = StepSample(
    num_running=2,
    num_new_sequences=0,
    num_continued_sequences=2,
    num_scheduled_tokens=2,
    is_decode_only=True,
    plan_bytes=0,
    wall_s=0.0,
    scheduler_s=0.0,
    executor_s=0.0,
    forward_s=0.0,
    sample_s=0.0,
    num_allocated_slots=0,
    num_stored_tokens=0,
    plan=StepPlan(step_id=1),
)


def sample(**changes) -> StepSample:
    return dataclasses.replace(BASE, **changes)


def test_kv_waste_sums_slots_and_tokens_over_live_steps() -> None:
    samples = [
        sample(num_running=2, num_allocated_slots=64, num_stored_tokens=40),
        sample(num_running=1, num_allocated_slots=32, num_stored_tokens=31),
        sample(num_running=0, num_allocated_slots=0, num_stored_tokens=0),
    ]
    waste = kv_waste(samples, block_size=16)
    assert (waste.num_steps, waste.allocated_slot_steps, waste.stored_token_steps) == (2, 96, 71)
    assert waste.waste_fraction == pytest.approx(25 / 96)
    assert (waste.peak_allocated_slots, waste.peak_stored_tokens) == (64, 40)
    # Worst step: 24 empty slots over 2 sequences of 16-slot blocks.
    assert waste.max_partial_blocks_per_sequence == pytest.approx(24 / 32)


def test_paged_capacity_fills_blocks_with_the_workload_in_order_cycling() -> None:
    # Lengths 16, 17 and 40 need 1, 2 and 3 blocks: 1+2+3+1+2 = 9 fit in 10 blocks, the next 3 do not.
    assert paged_capacity([16, 17, 40], num_blocks=10, block_size=16) == 5
    assert paged_capacity([33], num_blocks=2, block_size=16) == 0
    assert contiguous_capacity(num_slots=2048 * 16, max_model_len=2048) == 16
    with pytest.raises(ValueError):
        paged_capacity([], num_blocks=4, block_size=16)


def test_summarize_overhead_takes_medians_of_steady_decode_steps_only() -> None:
    plan = StepPlan(
        step_id=7,
        continued_sequences=(ContinuedSequence(SequenceId(1), 1), ContinuedSequence(SequenceId(2), 1)),
    )
    decode = [
        sample(
            wall_s=w, scheduler_s=0.001, executor_s=e, forward_s=f, sample_s=0.0005, plan_bytes=b, plan=plan
        )
        for w, e, f, b in [
            (0.100, 0.090, 0.080, 30),
            (0.020, 0.015, 0.010, 10),
            (0.020, 0.015, 0.010, 10),
            (0.024, 0.017, 0.012, 12),
            (0.022, 0.016, 0.011, 14),
        ]
    ]
    prefill = sample(is_decode_only=False, num_new_sequences=2, num_continued_sequences=0, wall_s=1.0)
    other_size = sample(num_continued_sequences=3, wall_s=5.0)
    point = summarize_overhead([prefill, *decode, other_size], num_running=2, block_size=16)
    steady = decode[NUM_WARMUP_DECODE_STEPS:]
    assert point.num_steps == len(steady) == 3
    assert point.wall_ms == pytest.approx(22.0)
    assert point.scheduler_ms == pytest.approx(1.0) and point.sampling_ms == pytest.approx(0.5)
    # executor - forward - sample: 16 - 11 - 0.5.
    assert point.executor_other_ms == pytest.approx(4.5)
    # wall - executor: 22 - 16.
    assert point.executor_idle_ms == pytest.approx(6.0)
    assert point.input_prep_ms > 0
    assert point.outside_forward_ms == pytest.approx(11.0 + point.input_prep_ms)
    assert point.forward_ms == pytest.approx(11.0 - point.input_prep_ms)
    assert point.plan_bytes == 12 and plan_to_pb(plan).ByteSize() > 0


def test_summarize_overhead_fails_without_a_matching_step() -> None:
    with pytest.raises(RuntimeError, match="no decode-only step ran with 5 sequences"):
        summarize_overhead([sample()], num_running=5, block_size=16)


def test_input_prep_is_timed_on_real_decode_batches() -> None:
    assert 0 < measure_input_prep(num_seqs=4, context_len=40, block_size=16, repeats=3) < 0.5
