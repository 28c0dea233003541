from __future__ import annotations

import pytest

from scheduler_service.swap_space import SwapSpace
from shared.step_plan import SequenceId

A, B = SequenceId(1), SequenceId(2)


def test_host_tables_are_private_and_freed_blocks_are_reused_last() -> None:
    space = SwapSpace(5)
    assert space.allocate(A, 2) == [0, 1]
    assert space.allocate(B, 2) == [2, 3]
    space.check_integrity()
    assert space.allocate(SequenceId(3), 2) is None
    assert not space.holds(SequenceId(3))
    assert (space.num_free_blocks, space.num_used_blocks) == (1, 4)
    space.free(A)
    space.check_integrity()
    assert space.block_ids(A) == () and space.block_ids(B) == (2, 3)
    assert space.allocate(A, 3) == [4, 0, 1]
    space.free(A)
    space.free(B)
    space.free(B)
    space.check_integrity()
    assert space.num_free_blocks == 5 and space.sequence_ids() == []


def test_an_empty_swap_space_never_swaps() -> None:
    space = SwapSpace(0)
    space.check_integrity()
    assert space.allocate(A, 1) is None
    with pytest.raises(ValueError, match="num_host_blocks must be >= 0"):
        SwapSpace(-1)


def test_check_integrity_catches_a_block_both_free_and_held() -> None:
    space = SwapSpace(3)
    space.allocate(A, 1)
    space._free_block_ids.append(0)
    with pytest.raises(AssertionError, match="both free and held"):
        space.check_integrity()
