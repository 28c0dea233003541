"""Batch invariance: a sequence's logits are bitwise the same alone, batched, chunked or preempted.

The model is the bench Llama's shape (hidden 512, intermediate 1408: the K at which MKL's sgemm
changes its reduction with the row count) with 2 layers, driven step by step over a shuffled paged
cache. Sequence X (a 150-token prompt, then 12 greedy tokens) runs in four schedules; every row X
samples from must be identical to the bit in all of them.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import BenchModelConfig, create_bench_model
from executor_service.model import load_model
from executor_service.model.invariant_linear import invariant_linear, pack_weight, silu_gate_times_up
from executor_service.ops.torch_ops import TorchOps

BLOCK_SIZE = 16
PROMPT_LEN = 150
NUM_DECODES = 12


class Driver:
    """Runs steps of {sequence: new token ids} like the executor; sequences can be dropped (preempted)."""

    def __init__(self, model, config, make_attention_metadata, num_blocks: int = 200) -> None:
        self.model = model
        self.make_attention_metadata = make_attention_metadata
        shape = (num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def drop(self, seq: str) -> None:
        self.free.extend(reversed(self.tables.pop(seq)))
        del self.computed[seq]

    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Logits of the last row of every sequence in `chunks`."""
        input_ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        for seq, token_ids in chunks.items():
            start = self.computed.get(seq, 0)
            end = start + len(token_ids)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            input_ids += token_ids
            positions += range(start, end)
            query_lens.append(len(token_ids))
            context_lens.append(end)
            tables.append(list(table))
            self.computed[seq] = end
        metadata = self.make_attention_metadata(query_lens, context_lens, tables, BLOCK_SIZE)
        last_rows = torch.tensor(query_lens).cumsum(0) - 1
        with torch.inference_mode():
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, metadata)
            logits = self.model.compute_logits(hidden[last_rows])
        return {seq: logits[i] for i, seq in enumerate(chunks)}


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = _tokens(PROMPT_LEN, 0)
OTHERS = {name: _tokens(300, seed) for seed, name in enumerate(("Y", "Z", "W"), start=1)}


class Others:
    """Feeds the companion sequences: a prompt chunk first, then one token per step."""

    def __init__(self) -> None:
        self.position = {name: 0 for name in OTHERS}

    def take(self, name: str, n: int) -> list[int]:
        start = self.position[name]
        self.position[name] = start + n
        return OTHERS[name][start : start + n]


def run_schedule(driver: Driver, schedule: str) -> list[torch.Tensor]:
    """X's sampling rows, in order, under one of the schedules."""
    others = Others()
    rows: list[torch.Tensor] = []
    generated: list[int] = []

    def sample(logits: torch.Tensor) -> None:
        rows.append(logits.clone())
        generated.append(int(logits.argmax()))

    if schedule == "alone":
        sample(driver.step({"X": PROMPT})["X"])
        for _ in range(NUM_DECODES):
            sample(driver.step({"X": generated[-1:]})["X"])
    elif schedule == "batched":
        out = driver.step({"Y": others.take("Y", 40), "X": PROMPT, "Z": others.take("Z", 9)})
        sample(out["X"])
        for i in range(NUM_DECODES):
            chunks = {"Z": others.take("Z", 1), "X": generated[-1:], "Y": others.take("Y", 1)}
            if i == 4:
                chunks["W"] = others.take("W", 280)  # a long prefill joins the decodes
            elif i > 4:
                chunks["W"] = others.take("W", 1)
            sample(driver.step(chunks)["X"])
    elif schedule == "chunked":
        driver.step({"Y": others.take("Y", 70), "X": PROMPT[:64]})
        driver.step({"X": PROMPT[64:114], "Y": others.take("Y", 1)})
        sample(driver.step({"Z": others.take("Z", 33), "X": PROMPT[114:]})["X"])
        for _ in range(NUM_DECODES):
            step = {"X": generated[-1:], "Y": others.take("Y", 1), "Z": others.take("Z", 1)}
            sample(driver.step(step)["X"])
    elif schedule == "preempted":
        out = driver.step({"X": PROMPT, "Y": others.take("Y", 20)})
        sample(out["X"])
        for _ in range(6):
            sample(driver.step({"Y": others.take("Y", 1), "X": generated[-1:]})["X"])
        driver.drop("X")  # recompute preemption: the blocks go back to the pool, others take them
        driver.step({"Z": others.take("Z", 60), "Y": others.take("Y", 1)})
        recomputed = PROMPT + generated[:-1]
        driver.step({"X'": recomputed[:100], "Y": others.take("Y", 1)})
        again = driver.step({"X'": recomputed[100:], "Z": others.take("Z", 1)})["X'"]
        assert torch.equal(again, rows[-1]), "the recomputed prompt's last row differs from its decode"
        for _ in range(NUM_DECODES - 6):
            step = {"X'": generated[-1:], "Y": others.take("Y", 1), "Z": others.take("Z", 1)}
            sample(driver.step(step)["X'"])
    else:
        raise AssertionError(schedule)
    return rows


@pytest.fixture(scope="module")
def bench_checkpoint(tmp_path_factory):
    config = BenchModelConfig(num_layers=2, max_position_embeddings=512)
    return create_bench_model(tmp_path_factory.mktemp("bench2"), config, seed=0)


def test_rows_are_bitwise_equal_in_every_schedule(bench_checkpoint, cpu_ops, make_attention_metadata):
    model, config = load_model(str(bench_checkpoint), torch.float32, torch.device("cpu"), cpu_ops)
    results = {
        schedule: run_schedule(Driver(model, config, make_attention_metadata), schedule)
        for schedule in ("alone", "batched", "chunked", "preempted")
    }
    alone = results["alone"]
    assert len(alone) == NUM_DECODES + 1
    for schedule, rows in results.items():
        assert len(rows) == len(alone), schedule
        for step, (row, expected) in enumerate(zip(rows, alone, strict=True)):
            assert torch.equal(row, expected), f"{schedule}: step {step} differs from the lone run"


def test_fast_path_matches_the_torch_reference(bench_checkpoint, cpu_ops, make_attention_metadata):
    """The same batched schedule through CpuOps and TorchOps: equal to float32 rounding."""
    fast, config = load_model(str(bench_checkpoint), torch.float32, torch.device("cpu"), cpu_ops)
    reference, _ = load_model(str(bench_checkpoint), torch.float32, torch.device("cpu"), TorchOps())
    got = run_schedule(Driver(fast, config, make_attention_metadata), "batched")
    want = run_schedule(Driver(reference, config, make_attention_metadata), "batched")
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("in_features", "out_features"), [(1408, 512), (512, 2816), (576, 49152)])
def test_linear_rows_do_not_depend_on_the_row_count(in_features, out_features):
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    x = torch.randn(300, in_features, generator=generator)
    packed = pack_weight(weight)
    full = invariant_linear(x, weight, None)
    for num_rows in (1, 2, 3, 15, 16, 57, 64, 200, 299):
        for first in (0, 1):
            rows = slice(first, first + num_rows)
            assert torch.equal(invariant_linear(x[rows], weight, None), full[rows])
            assert torch.equal(invariant_linear(x[rows], weight, None, packed), full[rows])
    torch.testing.assert_close(full, torch.nn.functional.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_fused_post_ops_match_the_unfused_math_and_stay_row_invariant():
    """The residual add inside the matmul and SwiGLU as two matmuls with post-ops: equal to the plain
    ops to float32 rounding, and a row's bits do not depend on the row count (1 is padded to 2)."""
    generator = torch.Generator().manual_seed(5)
    hidden, intermediate = 512, 1408
    gate_up = torch.randn(2 * intermediate, hidden, generator=generator) / hidden**0.5
    down = torch.randn(hidden, intermediate, generator=generator) / intermediate**0.5
    x = torch.randn(300, hidden, generator=generator)
    residual = torch.randn(300, hidden, generator=generator)
    gate_packed, up_packed = pack_weight(gate_up[:intermediate]), pack_weight(gate_up[intermediate:])
    inner = silu_gate_times_up(x, gate_up, gate_packed, up_packed)
    gate, up = torch.nn.functional.linear(x, gate_up).split(intermediate, dim=-1)
    torch.testing.assert_close(inner, torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-4)
    out = invariant_linear(inner, down, None, pack_weight(down), residual)
    torch.testing.assert_close(out, torch.nn.functional.linear(inner, down) + residual, atol=1e-5, rtol=1e-4)
    for num_rows in (1, 2, 15, 16, 64, 299):
        rows = slice(1, 1 + num_rows)
        assert torch.equal(silu_gate_times_up(x[rows], gate_up, gate_packed, up_packed), inner[rows])
        assert torch.equal(silu_gate_times_up(x[rows], gate_up), inner[rows])
        assert torch.equal(invariant_linear(inner[rows], down, None, None, residual[rows]), out[rows])
