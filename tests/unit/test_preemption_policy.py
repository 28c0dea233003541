from __future__ import annotations

import math

import pytest

from scheduler_service.preemption_policy import PreemptionMode, PreemptionPolicy, TransferSpeeds

# 1 MB blocks; 10 MB/s out, 20 MB/s in; 100 tokens/s prefill: swapping a block costs 0.15 s, recomputing
# a token 0.01 s, so swap wins above 15 tokens per block.
SPEEDS = TransferSpeeds(
    bytes_per_block=1_000_000,
    swap_out_bytes_per_second=10e6,
    swap_in_bytes_per_second=20e6,
    prefill_tokens_per_second=100.0,
)


def test_estimates_are_bytes_over_both_bandwidths_and_tokens_over_prefill_speed() -> None:
    policy = PreemptionPolicy("auto", SPEEDS)
    assert policy.swap_seconds(2) == pytest.approx(0.3)
    assert policy.recompute_seconds(50) == pytest.approx(0.5)
    assert PreemptionPolicy("swap").swap_seconds(2) is None


def test_auto_takes_the_cheaper_and_recomputes_on_a_tie() -> None:
    policy = PreemptionPolicy("auto", SPEEDS)
    swap = policy.choose(num_blocks=2, num_tokens_to_recompute=31, num_free_host_blocks=8)
    assert (swap.mode, swap.reason) == (PreemptionMode.SWAP, "swap is cheaper")
    assert swap.swap_seconds == pytest.approx(0.3) and swap.recompute_seconds == pytest.approx(0.31)
    recompute = policy.choose(num_blocks=2, num_tokens_to_recompute=29, num_free_host_blocks=8)
    assert recompute.mode is PreemptionMode.RECOMPUTE
    tie = PreemptionPolicy("auto", TransferSpeeds(1, 2.0, 2.0, 1.0)).choose(
        num_blocks=1, num_tokens_to_recompute=1, num_free_host_blocks=8
    )
    assert tie.mode is PreemptionMode.RECOMPUTE


def test_every_mode_recomputes_when_the_host_pool_is_too_small() -> None:
    for policy in (PreemptionPolicy("auto", SPEEDS), PreemptionPolicy("swap")):
        decision = policy.choose(num_blocks=3, num_tokens_to_recompute=10_000, num_free_host_blocks=2)
        assert decision.mode is PreemptionMode.RECOMPUTE
        assert decision.reason == "host pool full (2 free, 3 needed)"


def test_fixed_modes_ignore_the_costs() -> None:
    cheap_recompute = dict(num_blocks=100, num_tokens_to_recompute=1, num_free_host_blocks=100)
    assert PreemptionPolicy("swap", SPEEDS).choose(**cheap_recompute).mode is PreemptionMode.SWAP
    cheap_swap = dict(num_blocks=1, num_tokens_to_recompute=10_000, num_free_host_blocks=100)
    assert PreemptionPolicy("recompute", SPEEDS).choose(**cheap_swap).mode is PreemptionMode.RECOMPUTE


def test_no_measured_swap_speed_makes_swap_infinitely_dear() -> None:
    policy = PreemptionPolicy("auto", TransferSpeeds(1024, 0.0, 0.0, 100.0))
    decision = policy.choose(num_blocks=1, num_tokens_to_recompute=10_000, num_free_host_blocks=4)
    assert decision.mode is PreemptionMode.RECOMPUTE and decision.swap_seconds == math.inf


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="use one of auto, recompute, swap"):
        PreemptionPolicy("lru")
    with pytest.raises(ValueError, match="measured speeds"):
        PreemptionPolicy("auto")
