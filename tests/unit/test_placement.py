"""Placement: the longest exact prefix-cache hit, weighed against load, ties to the least loaded."""

from __future__ import annotations

from scheduler_service.placement import PlacementCandidate, choose_replica, choose_round_robin, placement_cost

ROOMY = 10_000


def candidate(cached: int = 0, load: int = 0, free: int = ROOMY) -> PlacementCandidate:
    return PlacementCandidate(num_cached_prompt_tokens=cached, num_load_tokens=load, num_free_tokens=free)


def test_no_candidate_places_nowhere() -> None:
    assert choose_replica([], 10) is None


def test_idle_executors_tie_and_the_first_wins_then_load_spreads_unrelated_requests() -> None:
    assert choose_replica([candidate(), candidate(), candidate()], 100) == 0
    assert choose_replica([candidate(load=100), candidate(), candidate()], 100) == 1
    assert choose_replica([candidate(load=100), candidate(load=100), candidate()], 100) == 2
    assert choose_replica([candidate(load=100), candidate(load=100), candidate(load=100)], 100) == 0


def test_the_longest_cache_hit_wins_while_its_executor_is_not_much_busier() -> None:
    # 64 cached tokens save 64 to compute: worth up to 64 more tokens of load.
    assert choose_replica([candidate(), candidate(cached=32), candidate(cached=64)], 100) == 2
    assert choose_replica([candidate(), candidate(cached=64, load=63)], 100) == 1
    assert placement_cost(candidate(cached=64, load=64), 100) == placement_cost(candidate(), 100) + 0 == 100
    # Equal cost: the least loaded wins, so a hot prefix stops piling onto one executor.
    assert choose_replica([candidate(cached=64, load=64), candidate()], 100) == 1
    assert choose_replica([candidate(cached=64, load=65), candidate()], 100) == 1


def test_a_hot_prefix_is_shared_out_once_its_executor_is_loaded() -> None:
    """Requests of a 96-token prefix + 4 own tokens, each adding 8 tokens of load where the prefix is
    cached (its blocks count once) and 100 elsewhere: the executor holding the prefix takes them until
    it is busier by the prefix, then the other computes the prefix and both share the stream."""
    executors = [candidate(cached=96), candidate()]
    choices = []
    for _ in range(16):
        index = choose_replica(executors, 100)
        assert index is not None
        choices.append(index)
        chosen = executors[index]
        added = 8 if chosen.num_cached_prompt_tokens else 100
        executors[index] = candidate(cached=96, load=chosen.num_load_tokens + added)
    assert choices == [0] * 12 + [1, 0, 1, 0]


def test_an_executor_without_room_for_the_prompt_pays_for_waiting() -> None:
    assert placement_cost(candidate(free=50), 100) == 200
    assert placement_cost(candidate(cached=64, free=50), 100) == 36
    assert choose_replica([candidate(free=50), candidate(load=90)], 100) == 1
    assert choose_replica([candidate(free=50), candidate(load=101)], 100) == 0


def test_round_robin_takes_each_in_turn_ignoring_cache_hits_and_skips_one_too_full() -> None:
    hot = PlacementCandidate(num_cached_prompt_tokens=512, num_load_tokens=0, num_free_tokens=10_000)
    cold = PlacementCandidate(num_cached_prompt_tokens=0, num_load_tokens=0, num_free_tokens=10_000)
    full = PlacementCandidate(num_cached_prompt_tokens=0, num_load_tokens=0, num_free_tokens=100)
    assert [choose_round_robin([hot, cold, cold], 600, turn) for turn in range(4)] == [0, 1, 2, 0]
    assert choose_round_robin([cold, full, cold], 600, 1) == 2
    assert choose_round_robin([full, full], 600, 1) == 1  # none holds it: its turn still
    assert choose_round_robin([], 600, 0) is None
