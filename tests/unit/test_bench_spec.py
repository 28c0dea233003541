"""`pagewire bench spec`'s pure parts: draft-counter differences and rates, the copy check, speed-ups,
the targets, the table, the workloads, the config and its flags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.metrics import RequestRecord, compute_metrics
from benchmarks.spec_bench import SpecBenchConfig, config_from_args, parse_batch_sizes
from benchmarks.spec_report import (
    DraftCounters,
    SpecRun,
    best_rows,
    copied_fraction,
    markdown_table,
    round_ratios,
    speedups,
    targets,
    targets_markdown,
)
from benchmarks.spec_workloads import CHAT, COPY, conversations, passages
from pagewire.cli import build_parser


def _info(drafts: int, tokens: int, accepted: int, per_position: list[int]) -> SimpleNamespace:
    return SimpleNamespace(num_drafts=drafts, num_draft_tokens=tokens, num_accepted_draft_tokens=accepted,
                           num_accepted_per_position=per_position)


def test_counters_are_differenced_per_run_and_positions_may_appear():
    before = DraftCounters.of(_info(10, 40, 30, []))
    after = DraftCounters.of(_info(30, 110, 70, [18, 10, 8, 4]))
    delta = after - before
    assert delta == DraftCounters(20, 70, 40, (18, 10, 8, 4))
    assert delta.acceptance_rate == pytest.approx(40 / 70)
    assert delta.acceptance_per_position == (0.9, 0.5, 0.4, 0.2)
    assert delta.mean_accepted_per_draft == 2.0
    assert after - after == DraftCounters(0, 0, 0, (0, 0, 0, 0))


def test_no_drafts_has_no_rates_and_counters_that_go_backwards_assert():
    idle = DraftCounters()
    assert idle.acceptance_rate is None and idle.acceptance_per_position == ()
    assert idle.mean_accepted_per_draft is None
    with pytest.raises(AssertionError, match="went backwards"):
        DraftCounters(1, 4, 2, (1, 1)) - DraftCounters(2, 8, 4, (2, 2))


def test_copied_fraction_counts_output_words_that_follow_the_passage_in_order():
    passage = "the quick brown fox jumps over the lazy dog"
    assert copied_fraction("the quick brown fox", passage) == 1.0
    assert copied_fraction("the  quick\nbrown fox jumps over", passage) == 1.0
    assert copied_fraction("the quick red fox", passage) == 0.75
    assert copied_fraction("something else entirely", passage) == 0.0
    assert copied_fraction("", passage) == 0.0


def _run(
    config: str, workload: str, batch: int, tpot_s: float, num_tokens: int, duration_s: float,
    round_index: int = 0,
) -> dict:
    """A run whose one request streams `num_tokens` one per `tpot_s` after a first token at 0.5 s."""
    chunk_times = tuple(0.5 + i * tpot_s for i in range(num_tokens))
    record = RequestRecord(0, 0.0, chunk_times[-1], chunk_times, (1,) * num_tokens)
    drafts = DraftCounters(4, 16, 12, (4, 3, 3, 2)) if config == "ngram" else DraftCounters()
    metrics = compute_metrics([record], duration_s)
    return SpecRun(config, workload, batch, 1, num_tokens, metrics, drafts, round_index=round_index).summary()


ROWS = [
    _run("off", COPY, 1, 0.100, 11, 1.5),
    _run("ngram", COPY, 1, 0.040, 11, 0.9),
    _run("off", COPY, 64, 0.200, 11, 2.0),
    _run("ngram", COPY, 64, 0.100, 11, 1.0),
    _run("off", CHAT, 64, 0.200, 11, 2.0),
    _run("ngram", CHAT, 64, 0.250, 11, 2.5),
]


def test_a_summary_reports_tpot_throughput_and_acceptance():
    row = ROWS[1]
    assert row["mean_tpot_ms"] == pytest.approx(40.0)
    assert row["output_tokens_per_s"] == pytest.approx(11 / 0.9, abs=0.01)
    assert row["acceptance_rate"] == 0.75 and row["acceptance_per_position"] == [1.0, 0.75, 0.75, 0.5]
    assert ROWS[0]["acceptance_rate"] is None and ROWS[0]["acceptance_per_position"] == []


def test_speedups_compare_every_config_with_off_at_the_same_workload_and_batch():
    assert speedups(ROWS) == [
        {"config": "ngram", "workload": COPY, "batch_size": 1, "tpot_speedup": 2.5,
         "throughput_ratio": 1.667},
        {"config": "ngram", "workload": COPY, "batch_size": 64, "tpot_speedup": 2.0, "throughput_ratio": 2.0},
        {"config": "ngram", "workload": CHAT, "batch_size": 64, "tpot_speedup": 0.8, "throughput_ratio": 0.8},
    ]


def test_the_best_round_counts_and_each_round_is_compared_with_off_in_the_same_round():
    second_round = [_run("off", COPY, 1, 0.100, 11, 3.0, 1), _run("ngram", COPY, 1, 0.040, 11, 0.8, 1)]
    rows = [*ROWS[:2], *second_round]
    assert best_rows(rows) == [ROWS[0], second_round[1]]
    assert round_ratios(rows) == {("ngram", COPY, 1): [1.67, 3.75]}
    table = markdown_table(rows).splitlines()
    assert len(table) == 4 and table[3].endswith("| 1.67x, 3.75x |") and "| 13.8 | 2.50x |" in table[3]


def test_targets_say_which_are_met():
    first, second = targets(ROWS, COPY, 64)
    assert first["met"] is True and first["measured"] == "2.50x"
    assert second["met"] is False and "ngram chat: 0.8x tok/s, 0.8x TPOT" in second["measured"]
    assert targets(ROWS[:4], COPY, 64)[1]["met"] is True
    diagnostic = [*ROWS[:4], {**ROWS[5], "config": "off-no-overlap"}, ROWS[4]]
    assert targets(diagnostic, COPY, 64)[1]["met"] is True  # a diagnostic row is not a configuration
    unmeasured = targets(ROWS[2:], COPY, 16)
    assert [c["met"] for c in unmeasured] == [None, None]
    assert "not met" in targets_markdown([second]) and "— met" in targets_markdown([first])


def test_the_table_has_a_line_per_run_and_per_configuration_not_run():
    table = markdown_table(ROWS, {"draft_model": "not built yet"}).splitlines()
    assert len(table) == 2 + len(ROWS) + 1
    assert table[3] == (
        "| copy | 1 | ngram | 1 x 11 | 40.0 | 12.2 | 2.50x | 75% | 100% / 75% / 75% / 50% | - | 1.67x |"
    )
    assert table[-1].startswith("| all | all | draft_model | not built yet |")


def test_workloads_are_deterministic_and_copy_prompts_hold_distinct_passages():
    copy = conversations(COPY, 6, seed=0)
    assert copy == conversations(COPY, 6, seed=0) and len(copy) == 6
    assert all(passage in turns[0].content for turns, passage in zip(copy, passages(6, 0)))
    assert len({turns[0].content for turns in copy}) == 6
    chat = conversations(CHAT, 3, seed=0)
    assert all(len(turns) == 1 and turns[0].role == "user" and turns[0].content.endswith(("?", "."))
               for turns in chat)
    with pytest.raises(ValueError, match="unknown workload"):
        conversations("summarize", 1, 0)


def test_config_sizes_requests_and_outputs_per_batch():
    config = SpecBenchConfig()
    assert [config.num_requests(b) for b in config.batch_sizes] == [2, 16, 64]
    assert [config.output_len_at(b) for b in config.batch_sizes] == [96, 96, 48]
    no_cache = "--no-enable-prefix-caching"
    assert config.scheduler_args("off") == [no_cache]
    assert config.scheduler_args("ngram") == [
        no_cache, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'
    ]
    assert config.scheduler_args("off-no-overlap") == [no_cache, "--max-plans-in-flight", "1"]
    with pytest.raises(ValueError, match="unknown --workloads"):
        SpecBenchConfig(workloads=("copy", "rag"))
    with pytest.raises(ValueError, match="must start with off"):
        SpecBenchConfig(configs=("ngram", "off"))
    with pytest.raises(ValueError, match="must start with off"):
        SpecBenchConfig(configs=("off", "eagle"))
    with pytest.raises(ValueError, match="--batch-sizes"):
        SpecBenchConfig(batch_sizes=(0, 4))


def test_flags_build_the_config():
    args = build_parser().parse_args(
        ["bench", "spec", "--batch-sizes", "16,1", "--workloads", "copy", "--output-len", "32",
         "--configs", "off, ngram,off-no-overlap"]
    )
    config = config_from_args(args)
    assert config.batch_sizes == (1, 16) and config.workloads == ("copy",) and config.output_len == 32
    assert config.configs == ("off", "ngram", "off-no-overlap")
    assert config_from_args(build_parser().parse_args(["bench", "spec"])) == SpecBenchConfig()
    assert parse_batch_sizes("64, 1,16") == (1, 16, 64)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_batch_sizes("1,x")


def test_a_draft_model_configuration_goes_to_both_services():
    config = SpecBenchConfig(configs=("off", "draft_model"), draft_model="/d", num_speculative_tokens=3)
    spec = '{"method": "draft_model", "model": "/d", "num_speculative_tokens": 3}'
    assert config.scheduler_args("draft_model") == ["--no-enable-prefix-caching", "--speculative-config", spec]
    assert config.executor_args("draft_model") == ["--kv-cache-memory", "1GiB", "--speculative-config", spec]
    assert config.executor_args("off") == ["--kv-cache-memory", "1GiB"]
    assert config.not_run == {} and "draft_model" in SpecBenchConfig().not_run
    with pytest.raises(ValueError, match="needs --draft-model DIR"):
        SpecBenchConfig(configs=("off", "draft_model"))
