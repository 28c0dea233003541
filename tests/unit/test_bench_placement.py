"""benchmarks/placement_bench.py's workload and table (the benchmark itself runs real processes)."""

from __future__ import annotations

import argparse

from benchmarks.placement_bench import PolicyResult, format_table, workload


def args(**overrides: int) -> argparse.Namespace:
    values = {"seed": 0, "tenants": 3, "requests_per_tenant": 4, "prefix_len": 32, "suffix_len": 5} | overrides
    return argparse.Namespace(**values)


def test_each_tenants_requests_share_its_prefix_and_the_order_is_reproducible() -> None:
    prompts = workload(args())
    assert prompts == workload(args()) and len(prompts) == 12
    assert all(len(p) == 37 for p in prompts)
    prefixes = [tuple(p[:32]) for p in prompts]
    assert len(set(prefixes)) == 3 and all(prefixes.count(prefix) == 4 for prefix in set(prefixes))
    assert len({tuple(p[32:]) for p in prompts}) == 12
    assert prompts != workload(args(seed=1))


def test_the_table_reports_the_hit_rate_against_the_best_possible() -> None:
    result = PolicyResult("round-robin", 1000, 250, 750, [2, 2], 1.5, 40.0)
    assert result.hit_rate == 0.25
    row = format_table([result], 0.5).splitlines()[2]
    assert row == "| round-robin | 250 of 1,000 | 25.0% (50.0%) | 750 | 2, 2 | 1.5 | 40 |"
