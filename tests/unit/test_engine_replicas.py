"""The engine over several executor replicas, driven step by step with in-process executor mirrors:
placement, an executor lost mid-stream, no executor at all, drain."""

from __future__ import annotations

import time

import pytest

from executor_service.tiny_model import create_tiny_model
from scheduler_service.lora.adapter_files import LoraModelShape
from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.executor_replica import ExecutorReplica
from scheduler_service.request_state import RequestDelta, RequestState
from shared.errors import Unavailable
from shared.sampling_params import SamplingParams
from shared.step_plan import SequenceOutput, StepPlan, StepResult
from tests.helpers.executor_mirror import ExecutorMirror, sampled_token

ADDRESSES = ("10.0.0.1:50061", "10.0.0.2:50061", "10.0.0.3:50061")
BLOCK_SIZE = 4
NUM_BLOCKS = 64
MAX_TOKENS = 6


def in_vocab(token_id: int) -> int:
    """The mirror's sampled ids folded into the tiny model's vocabulary (no EOS)."""
    return 10 + token_id % 200


class InVocabMirror(ExecutorMirror):
    def step(self, plan: StepPlan) -> StepResult:
        result = super().step(plan)
        outputs = tuple(
            SequenceOutput(o.sequence_id, tuple(in_vocab(t) for t in o.token_ids)) for o in result.outputs
        )
        return StepResult(step_id=result.step_id, outputs=outputs)


@pytest.fixture(scope="module")
def description(tmp_path_factory: pytest.TempPathFactory) -> ExecutorDescription:
    model_dir = create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    return ExecutorDescription(
        model_name="tiny", model_path=str(model_dir), architecture="LlamaForCausalLM", vocab_size=260,
        max_model_len=128, eos_token_ids=(257,), block_size=BLOCK_SIZE, num_device_blocks=NUM_BLOCKS,
        num_host_blocks=0, bytes_per_block=4096, swap_out_bytes_per_second=4e9, swap_in_bytes_per_second=4e9,
        prefill_tokens_per_second=75_000.0, device="cpu", max_num_batched_tokens=256, max_num_seqs=16,
        max_logprobs=20,
        lora_shape=LoraModelShape(num_layers=2, hidden_size=64, intermediate_size=128, q_size=64, kv_size=32),
    )


class Cluster:
    """An engine whose replicas are connected by hand to mirrors; `run` steps them round robin."""

    def __init__(self, description: ExecutorDescription, **config: object) -> None:
        self.description = description
        self.engine = Engine(EngineConfig(executor_addresses=ADDRESSES, max_plans_in_flight=1, **config))
        self.mirrors: dict[str, InVocabMirror] = {}
        for address in ADDRESSES:
            replica = ExecutorReplica(address, self.engine.config, self.engine, self.engine.observer)
            self.engine.replicas[address] = replica
            self.connect(address)

    def replica(self, index: int) -> ExecutorReplica:
        return self.engine.replicas[ADDRESSES[index]]

    def connect(self, address: str) -> None:
        """What `ExecutorReplica._connect` does once Describe answered: a fresh executor."""
        replica = self.engine.replicas[address]
        replica._prepare(self.description)
        self.engine.accept(replica, self.description)
        replica.description = self.description
        replica._is_ready = True
        self.mirrors[address] = InVocabMirror(BLOCK_SIZE, NUM_BLOCKS)
        self.engine.on_ready(replica)

    def step(self, address: str) -> None:
        replica = self.engine.replicas[address]
        scheduler = replica.scheduler
        assert scheduler is not None
        if not replica.is_ready or not scheduler.has_work:
            return
        plan = scheduler.schedule()
        if plan is None:
            return
        outputs = scheduler.apply_result(self.mirrors[address].step(plan))
        self.engine.on_outputs(replica, outputs)
        scheduler.check_integrity()

    def run(self, num_rounds: int = 100) -> None:
        for _ in range(num_rounds):
            for address in ADDRESSES:
                self.step(address)

    def submit(self, prompt: tuple[int, ...], cache_salt: str | None = None) -> RequestState:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return self.engine.add_request(prompt, params, cache_salt=cache_salt)

    def placed_on(self, request: RequestState) -> int:
        return ADDRESSES.index(self.engine._placed[request.sequence_id].address)

    def assert_all_blocks_free(self) -> None:
        for replica in self.engine.replicas.values():
            assert replica.scheduler is not None
            replica.scheduler.check_integrity()
            assert replica.scheduler.kv_cache_manager.num_free_blocks == NUM_BLOCKS


def output_tokens(request: RequestState) -> list[int]:
    tokens: list[int] = []
    while not request.deltas.empty():
        delta = request.deltas.get_nowait()
        assert isinstance(delta, RequestDelta), delta
        tokens.extend(delta.token_ids)
    return tokens


def expected_tokens(request: RequestState, num_prompt_tokens: int) -> list[int]:
    """What the mirror samples at each output position of the request's sequence."""
    return [in_vocab(sampled_token(request.sequence_id, num_prompt_tokens + i)) for i in range(MAX_TOKENS)]


def prompt(first: int, num_tokens: int = 10) -> tuple[int, ...]:
    return tuple(first + i for i in range(num_tokens))


def test_unrelated_requests_spread_over_the_executors_and_all_finish(description) -> None:
    cluster = Cluster(description)
    requests = [cluster.submit(prompt(20 * i)) for i in range(6)]
    assert [cluster.placed_on(r) for r in requests] == [0, 1, 2, 0, 1, 2]
    cluster.run()
    for request in requests:
        assert output_tokens(request) == expected_tokens(request, 10)
    assert [s.num_requests_placed for s in cluster.engine.statuses()] == [2, 2, 2]
    assert cluster.engine.requests == {}
    cluster.assert_all_blocks_free()


def test_a_shared_prefix_goes_to_the_executor_that_caches_it(description) -> None:
    cluster = Cluster(description)
    shared = prompt(100, 12)
    first = cluster.submit(shared + (1, 2))
    assert cluster.placed_on(first) == 0
    cluster.run()
    busy = [cluster.submit(prompt(20 * i, 8)) for i in range(3)]
    assert [cluster.placed_on(r) for r in busy] == [0, 1, 2]
    # Executor 0 caches the 12-token prefix: worth more than its 8 live tokens.
    again = cluster.submit(shared + (3, 4))
    assert cluster.placed_on(again) == 0
    # Another salt shares nothing: least loaded, the first such.
    salted = cluster.submit(shared + (3, 4), cache_salt="tenant-b")
    assert cluster.placed_on(salted) == 1
    cluster.run()
    statuses = cluster.engine.statuses()
    assert [s.counters.num_prompt_tokens_cached for s in statuses] == [12, 0, 0]
    cluster.assert_all_blocks_free()


def test_a_lost_executors_requests_finish_on_the_others_with_no_token_lost_or_repeated(description) -> None:
    cluster = Cluster(description)
    requests = [cluster.submit(prompt(20 * i)) for i in range(6)]
    for _ in range(3):  # prefill, then two decode steps everywhere
        for address in ADDRESSES:
            cluster.step(address)
    on_lost = [r for r in requests if cluster.placed_on(r) == 1]
    assert len(on_lost) == 2
    cluster.replica(1)._on_lost("network cut")
    assert not cluster.replica(1).is_ready
    assert sorted(cluster.placed_on(r) for r in on_lost) == [0, 2]
    cluster.run()
    for request in requests:
        assert output_tokens(request) == expected_tokens(request, 10)
    assert [s.num_requests_placed for s in cluster.engine.statuses()] == [3, 2, 3]
    cluster.connect(ADDRESSES[1])
    late = cluster.submit(prompt(200))
    assert cluster.placed_on(late) == 0
    cluster.run()
    assert output_tokens(late) == expected_tokens(late, 10)
    cluster.assert_all_blocks_free()


def test_with_no_executor_left_requests_wait_then_fail_unavailable(description) -> None:
    cluster = Cluster(description, reconnect_grace_seconds=5.0)
    kept, failed = cluster.submit(prompt(0)), cluster.submit(prompt(50))
    cluster.run(2)
    for index in range(3):
        cluster.replica(index)._on_lost("executor killed")
    assert not cluster.engine.is_ready
    with pytest.raises(Unavailable):
        cluster.submit(prompt(90))
    # Back within the grace: the waiting requests resume there, their streams continuing.
    cluster.connect(ADDRESSES[2])
    assert cluster.placed_on(kept) == 2 and cluster.placed_on(failed) == 2
    cluster.run()
    assert output_tokens(kept) == expected_tokens(kept, 10)
    assert output_tokens(failed) == expected_tokens(failed, 10)

    late = cluster.submit(prompt(120))
    cluster.run(1)
    cluster.replica(2)._on_lost("executor killed")
    assert cluster.engine._homeless_since is not None
    cluster.engine._fail_homeless_after_grace()
    assert cluster.engine.requests  # still within the grace
    cluster.engine._homeless_since = time.monotonic() - 6.0
    cluster.engine._fail_homeless_after_grace()
    deltas = []
    while not late.deltas.empty():
        deltas.append(late.deltas.get_nowait())
    assert isinstance(deltas[-1], Unavailable) and "--reconnect-grace-seconds" in str(deltas[-1])
    assert cluster.engine.requests == {}


def test_a_draining_executor_takes_nothing_new_and_finishes_what_runs(description) -> None:
    cluster = Cluster(description)
    running = cluster.submit(prompt(0))
    assert cluster.placed_on(running) == 0
    cluster.step(ADDRESSES[0])
    status = cluster.engine.drain(ADDRESSES[0])
    assert (status.is_draining, status.num_running) == (True, 1)
    later = [cluster.submit(prompt(20 * i)) for i in range(1, 5)]
    assert [cluster.placed_on(r) for r in later] == [1, 2, 1, 2]
    cluster.run()
    assert output_tokens(running) == expected_tokens(running, 10)
    assert [s.num_requests_placed for s in cluster.engine.statuses()] == [1, 2, 2]
    cluster.assert_all_blocks_free()
    with pytest.raises(Exception, match="no executor 'nowhere:1'"):
        cluster.engine.drain("nowhere:1")


def test_totals_add_up_the_executors(description) -> None:
    cluster = Cluster(description)
    cluster.submit(prompt(0))
    cluster.submit(prompt(20))
    total = cluster.engine.totals()
    assert (total.num_device_blocks, total.num_waiting, total.num_requests_placed) == (3 * NUM_BLOCKS, 2, 2)
    assert total.address == ",".join(ADDRESSES)
    assert total.block_size == BLOCK_SIZE and total.device == "cpu"


def test_a_hot_prefix_keeps_its_executor_while_running_requests_share_it(description) -> None:
    """A 40-token prefix (10 blocks) + 2 own tokens: a request running there holds at most 2 blocks of
    its own (8 tokens of load) and shares the prefix blocks, which count for nothing, so the executor
    holding the prefix stays cheaper than computing it elsewhere (42 tokens) while these run."""
    cluster = Cluster(description)
    shared = prompt(100, 40)
    cluster.submit(prompt(200, 8))
    holder = cluster.placed_on(cluster.submit(shared + (0, 1)))
    cluster.run()
    kv = cluster.replica(holder).scheduler.kv_cache_manager
    assert (kv.find_cached_prefix(shared + (7, 8), (None, None)).num_tokens, kv.num_free_blocks) == (40, NUM_BLOCKS)
    requests, placements = [], []
    for i in range(6):
        requests.append(cluster.submit(shared + (2 * i + 2, 2 * i + 3)))
        placements.append(cluster.placed_on(requests[-1]))
        for address in ADDRESSES:  # admitted and prefilled before the next arrives
            cluster.step(address)
    assert kv.find_cached_prefix(shared + (7, 8), (None, None)).num_held_tokens == 40
    assert placements == [holder] * 6
    cluster.run()
    for request in requests:
        assert output_tokens(request) == expected_tokens(request, 42)
    cluster.assert_all_blocks_free()


def test_an_executor_whose_health_turns_not_serving_gets_no_new_work_until_it_serves_again(description) -> None:
    cluster = Cluster(description)
    running = cluster.submit(prompt(0))
    cluster.step(ADDRESSES[0])
    cluster.replica(0)._on_health(False)  # its SIGTERM: health goes NOT_SERVING before the stream ends
    assert cluster.engine.statuses()[0].is_draining
    assert [cluster.placed_on(cluster.submit(prompt(20 * i))) for i in range(1, 3)] == [1, 2]
    cluster.replica(0)._on_health(True)
    assert cluster.replica(0).accepts_work and not cluster.engine.statuses()[0].is_draining
    # Executor 0 holds 3 blocks (12 tokens) for its running request, 1 and 2 a waiting 10-token one each.
    assert [cluster.placed_on(cluster.submit(prompt(20 * i))) for i in range(3, 6)] == [1, 2, 0]
    cluster.run()
    assert output_tokens(running) == expected_tokens(running, 10)
    cluster.assert_all_blocks_free()
