"""What the engine keeps and what it takes anew when its executor comes back (no services: `_prepare`)."""

from __future__ import annotations

import dataclasses

import pytest

from executor_service.tiny_model import create_tiny_model
from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.executor_description import ExecutorDescription


@pytest.fixture(scope="module")
def description(tmp_path_factory: pytest.TempPathFactory) -> ExecutorDescription:
    model_dir = create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    return ExecutorDescription(
        model_name="tiny",
        model_path=str(model_dir),
        architecture="LlamaForCausalLM",
        vocab_size=260,
        max_model_len=512,
        eos_token_ids=(257,),
        block_size=16,
        num_device_blocks=64,
        num_host_blocks=32,
        bytes_per_block=4096,
        swap_out_bytes_per_second=4e9,
        swap_in_bytes_per_second=4e9,
        prefill_tokens_per_second=75_000.0,
        device="cpu",
        max_num_batched_tokens=512,
        max_num_seqs=8,
        max_logprobs=20,
    )


def connected(engine: Engine, description: ExecutorDescription) -> None:
    engine._prepare(description)
    engine.description = description


def test_a_restarted_executor_of_the_same_geometry_keeps_the_scheduler_but_not_the_old_speeds(description):
    engine = Engine(EngineConfig(executor_address="127.0.0.1:1"))
    connected(engine, description)
    scheduler = engine.scheduler
    assert scheduler is not None
    assert scheduler.preemption_policy.speeds == description.transfer_speeds

    slower = dataclasses.replace(description, swap_out_bytes_per_second=1e8, prefill_tokens_per_second=9_000.0)
    connected(engine, slower)
    assert engine.scheduler is scheduler
    assert scheduler.preemption_policy.speeds == slower.transfer_speeds
    assert scheduler.preemption_policy.recompute_seconds(9_000) == pytest.approx(1.0)


def test_an_executor_of_another_geometry_gets_a_new_scheduler(description):
    engine = Engine(EngineConfig(executor_address="127.0.0.1:1"))
    connected(engine, description)
    first = engine.scheduler
    bigger = dataclasses.replace(description, num_device_blocks=128, swap_in_bytes_per_second=1e9)
    connected(engine, bigger)
    assert engine.scheduler is not first
    assert engine.scheduler is not None
    assert engine.scheduler.kv_cache_manager.block_pool.num_blocks == 128
    assert engine.scheduler.preemption_policy.speeds == bigger.transfer_speeds
