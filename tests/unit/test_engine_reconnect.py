"""What an executor replica keeps and what it takes anew when its executor comes back (no services: `_prepare`)."""

from __future__ import annotations

import dataclasses

import pytest

from executor_service.tiny_model import create_tiny_model
from scheduler_service.lora.adapter_files import LoraModelShape
from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.engine_observer import EngineObserver
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.executor_replica import ExecutorReplica


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
        lora_shape=LoraModelShape(num_layers=2, hidden_size=64, intermediate_size=128, q_size=64, kv_size=32),
    )


def make_replica() -> ExecutorReplica:
    config = EngineConfig(executor_addresses=("127.0.0.1:1",))
    return ExecutorReplica("127.0.0.1:1", config, Engine(config), EngineObserver())


def connected(replica: ExecutorReplica, description: ExecutorDescription) -> None:
    replica._prepare(description)
    replica.description = description


def test_a_restarted_executor_of_the_same_geometry_keeps_the_scheduler_but_not_the_old_speeds(description):
    replica = make_replica()
    connected(replica, description)
    scheduler = replica.scheduler
    assert scheduler is not None
    assert scheduler.preemption_policy.speeds == description.transfer_speeds

    slower = dataclasses.replace(description, swap_out_bytes_per_second=1e8, prefill_tokens_per_second=9_000.0)
    connected(replica, slower)
    assert replica.scheduler is scheduler
    assert scheduler.preemption_policy.speeds == slower.transfer_speeds
    assert scheduler.preemption_policy.recompute_seconds(9_000) == pytest.approx(1.0)


def test_an_executor_of_another_geometry_gets_a_new_scheduler(description):
    replica = make_replica()
    connected(replica, description)
    first = replica.scheduler
    bigger = dataclasses.replace(description, num_device_blocks=128, swap_in_bytes_per_second=1e9)
    connected(replica, bigger)
    assert replica.scheduler is not first
    assert replica.scheduler is not None
    assert replica.scheduler.kv_cache_manager.block_pool.num_blocks == 128
    assert replica.scheduler.preemption_policy.speeds == bigger.transfer_speeds


def test_an_executor_of_another_model_is_refused_and_the_same_model_accepted(description):
    engine = Engine(EngineConfig(executor_addresses=("127.0.0.1:1", "127.0.0.1:2")))
    replica = make_replica()
    engine.accept(replica, description)
    assert engine.model is not None and engine.model.vocab_size == 260
    engine.accept(replica, dataclasses.replace(description, num_device_blocks=7, device="cuda:1"))
    with pytest.raises(ValueError, match="executor 127.0.0.1:1 serves another model: it serves"):
        engine.accept(replica, dataclasses.replace(description, vocab_size=300))
    with pytest.raises(ValueError, match="its model is 256 tokens long, the scheduler serves 512"):
        engine.accept(replica, dataclasses.replace(description, max_model_len=256))
