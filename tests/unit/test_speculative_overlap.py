"""Speculation and overlap scheduling: a replica keeps one plan in flight only while the next step drafts
for some sequence, and otherwise sends the next plan before the previous result (speculation that
proposes nothing costs no overlap)."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.executor_replica import ExecutorReplica
from scheduler_service.lora.adapter_files import LoraModelShape
from scheduler_service.sequence import Sequence, SequenceStatus
from scheduler_service.speculative.speculation_policy import SpeculationPolicy, StepTimeModel
from shared.step_plan import SequenceId, StepPlan, StepResult
from tests.helpers.executor_mirror import ExecutorMirror, own_prompt

ADDRESS = "127.0.0.1:1"
DRAFT_MODEL = '{"method": "draft_model", "model": "draft", "num_speculative_tokens": 4}'


def half_bar_at_batch_1() -> StepTimeModel:
    """A decode step costs 1 ms + 1 ms per token: at batch 1 a draft token pays at acceptance >= 0.5."""
    model = StepTimeModel()
    for num_tokens in [1, 8, 64, 3, 200, 17] * 5:
        model.observe(num_tokens, 0.001 + 0.001 * num_tokens)
    return model


def policy() -> SpeculationPolicy:
    policy = SpeculationPolicy()
    policy.step_time = half_bar_at_batch_1()
    return policy


def in_flight_seq(
    *, num_prompt: int = 5, num_output: int = 1, num_in_flight: int = 1, num_model_drafts: int = 0,
    num_computed: int | None = None, acceptance: float = 0.7, speculative: bool = True,
    max_num_tokens: int | None = 32,
) -> Sequence:
    """A running sequence with `num_in_flight` sampled tokens in flight (its decodes, or its last prompt
    chunk then decodes), the first verifying `num_model_drafts` drafts; or, with `num_computed`, a prompt
    chunk in flight that samples nothing."""
    seq = Sequence(SequenceId(1), own_prompt(1, num_prompt), arrival_index=1, speculative=speculative,
                   draft_acceptance=acceptance, max_num_tokens=max_num_tokens)
    seq.output_token_ids = [7] * num_output
    seq.status = SequenceStatus.RUNNING
    seq.num_output_placeholders = num_in_flight
    seq.num_model_drafts = num_model_drafts
    in_flight = seq.num_tokens - 1 + num_in_flight + num_model_drafts
    seq.num_computed_tokens = in_flight if num_computed is None else num_computed
    return seq


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        pytest.param(in_flight_seq(), True, id="its decode in flight, acceptance over the bar"),
        pytest.param(in_flight_seq(num_model_drafts=3), True, id="its verification in flight"),
        pytest.param(in_flight_seq(num_output=0), True, id="its last prompt chunk in flight"),
        pytest.param(in_flight_seq(num_in_flight=2), True, id="two decodes in flight"),
        pytest.param(in_flight_seq(acceptance=0.45), False, id="its drafts kept failing: draft length 0"),
        pytest.param(in_flight_seq(speculative=False), False, id="the request opts out"),
        # Used to keep one plan in flight: the rule looked at acceptance alone.
        pytest.param(in_flight_seq(num_prompt=20, num_output=0, num_in_flight=0, num_computed=8), False,
                     id="an early chunk of its prompt in flight"),
        pytest.param(in_flight_seq(num_output=0, max_num_tokens=7), False,
                     id="its next step samples its last token"),
        pytest.param(in_flight_seq(max_num_tokens=None, num_prompt=30), False,
                     id="its next step reaches max_model_len"),
    ],
)
def test_the_next_step_drafts_only_for_a_decode_whose_draft_length_is_above_0(
    seq: Sequence, expected: bool
) -> None:
    assert policy().drafts_next_step([seq], max_num_draft_tokens=4, max_model_len=32) is expected


def test_the_bar_is_that_of_every_sequence_running_and_adaptive_off_drafts_up_to_the_end() -> None:
    fair = in_flight_seq(acceptance=0.6)
    others = [in_flight_seq(speculative=False) for _ in range(9)]
    # bar 0.5 with fair alone, 10 / 11 with the ten running.
    assert policy().drafts_next_step([fair], 4, 32)
    assert not policy().drafts_next_step([fair, *others], 4, 32)
    measuring = policy()
    measuring.adaptive = False
    assert measuring.drafts_next_step([in_flight_seq(acceptance=0.0)], 4, 32)
    assert not measuring.drafts_next_step([in_flight_seq(acceptance=0.0)], 0, 32)  # a budget of 1 token
    assert not measuring.drafts_next_step([in_flight_seq(acceptance=1.0, max_num_tokens=7)], 4, 32)


class MirrorClient:
    """The replica's end of the Step stream, answered by an executor mirror in the order plans were
    sent; records how many plans were in flight when each was sent and when each result was read."""

    def __init__(self, mirror: ExecutorMirror) -> None:
        self.mirror = mirror
        self.num_plan_bytes_sent = 0
        self.sent: deque[StepPlan] = deque()
        self.in_flight_at_send: list[int] = []
        self.in_flight_at_receive: list[int] = []
        self.plans: list[StepPlan] = []

    async def send(self, plan: StepPlan) -> None:
        self.in_flight_at_send.append(len(self.sent))
        self.sent.append(plan)
        self.plans.append(plan)

    async def receive(self) -> StepResult:
        self.in_flight_at_receive.append(len(self.sent))
        return self.mirror.step(self.sent.popleft())


def description(max_model_drafts: int) -> ExecutorDescription:
    return ExecutorDescription(
        model_name="tiny", model_path="/nowhere", architecture="LlamaForCausalLM", vocab_size=260,
        max_model_len=64, eos_token_ids=(257,), block_size=4, num_device_blocks=16, num_host_blocks=0,
        bytes_per_block=4096, swap_out_bytes_per_second=4e9, swap_in_bytes_per_second=4e9,
        prefill_tokens_per_second=75_000.0, device="cpu", max_num_batched_tokens=8, max_num_seqs=4,
        max_logprobs=20, max_model_drafts=max_model_drafts,
        lora_shape=LoraModelShape(num_layers=2, hidden_size=64, intermediate_size=128, q_size=64, kv_size=32),
    )


def run_replica(speculative_config: str | None, mirror: ExecutorMirror, seq: Sequence) -> MirrorClient:
    """Runs `seq` on a replica (its real `_step` loop, two plans in flight at most) until it has all
    its tokens, the executor a mirror whose steps take no time (so the policy's fit stays as given)."""
    config = EngineConfig(executor_addresses=(ADDRESS,), max_num_batched_tokens=8, max_num_seqs=4,
                          speculative_config=speculative_config)
    engine = Engine(config)
    replica = ExecutorReplica(ADDRESS, config, engine, engine.observer)
    replica._prepare(description(max_model_drafts=4))
    scheduler = replica.scheduler
    assert scheduler is not None and config.max_plans_in_flight == 2
    scheduler.speculation.step_time = half_bar_at_batch_1()
    client = replica.client = MirrorClient(mirror)  # type: ignore[assignment]
    scheduler.add_sequence(seq)

    async def steps() -> None:
        while seq.num_tokens < (seq.max_num_tokens or 0):
            await replica._step()
            scheduler.check_integrity()

    asyncio.run(steps())
    assert scheduler.num_in_flight == 0
    return client


def drafts(plan: StepPlan) -> int:
    return sum(c.num_model_drafts + len(c.draft_token_ids) for c in plan.continued_sequences)


def test_a_draft_model_that_is_never_right_costs_one_plan_at_a_time_only_while_it_is_tried() -> None:
    """A 20-token prompt in chunks of 8, 8 and 4, then decodes to 28 tokens. The chunks before the last
    overlap (they used to go one at a time: the prior acceptance 0.7 is over the bar 0.5); the plan after
    the last chunk waits for its result, so the first decode drafts (one token: 0.7^2 < 0.5); after two
    failed drafts (0.7 -> 0.56 -> 0.45) the draft length is 0 and overlap resumes for good: the rate
    recovers once, in the one plan sent with nothing of the sequence in flight, then stays put."""
    seq = Sequence(SequenceId(1), own_prompt(1, 20), arrival_index=1, max_num_tokens=28)
    client = run_replica(DRAFT_MODEL, ExecutorMirror(4, 16, num_right_model_drafts=0), seq)
    assert [drafts(plan) for plan in client.plans] == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert [plan.num_scheduled_tokens for plan in client.plans] == [8, 8, 4, 2, 2, 1, 1, 1, 1, 1]
    assert client.in_flight_at_send == [0, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    assert client.in_flight_at_receive == [2, 2, 1, 1, 1, 2, 2, 2, 2, 1]
    assert seq.draft_acceptance == pytest.approx(SpeculationPolicy.recovered(0.7 * 0.8 * 0.8))
    assert seq.output_token_ids == [1000 + position for position in range(20, 28)]


def test_drafts_that_are_always_right_go_one_plan_at_a_time_and_speculation_off_overlaps() -> None:
    seq = Sequence(SequenceId(1), own_prompt(1, 20), arrival_index=1, max_num_tokens=28)
    client = run_replica(DRAFT_MODEL, ExecutorMirror(4, 16, num_right_model_drafts=4), seq)
    # Acceptance 0.7 -> 0.76 -> 0.85: one draft, two (0.76^2 >= 0.5), one (the room left before 28).
    assert [drafts(plan) for plan in client.plans] == [0, 0, 0, 1, 2, 1]
    assert client.in_flight_at_send == [0, 1, 1, 0, 0, 0]
    assert client.in_flight_at_receive == [2, 2, 1, 1, 1, 1]
    assert seq.output_token_ids == [1000 + position for position in range(20, 28)]
    off = Sequence(SequenceId(1), own_prompt(1, 20), arrival_index=1, max_num_tokens=28)
    client = run_replica(None, ExecutorMirror(4, 16), off)
    assert client.in_flight_at_receive == [2, 2, 2, 2, 2, 2, 2, 2, 2, 1]
