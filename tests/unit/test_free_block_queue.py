from __future__ import annotations

import pytest

from scheduler_service.block_pool import Block
from scheduler_service.free_block_queue import FreeBlockQueue
from shared.step_plan import BlockId


def make_blocks(num_blocks: int) -> list[Block]:
    return [Block(BlockId(i)) for i in range(num_blocks)]


def ids(queue: FreeBlockQueue) -> list[int]:
    return [block.block_id for block in queue]


def test_starts_in_the_given_order() -> None:
    queue = FreeBlockQueue(make_blocks(4))
    queue.check_integrity()
    assert len(queue) == 4
    assert ids(queue) == [0, 1, 2, 3]


def test_popleft_takes_the_head_and_append_goes_to_the_tail() -> None:
    blocks = make_blocks(3)
    queue = FreeBlockQueue(blocks)
    assert queue.popleft() is blocks[0]
    assert queue.popleft() is blocks[1]
    queue.append(blocks[0])
    queue.check_integrity()
    assert ids(queue) == [2, 0]
    assert blocks[1] not in queue
    assert blocks[0] in queue and blocks[2] in queue


@pytest.mark.parametrize(("removed", "expected"), [(0, [1, 2, 3]), (2, [0, 1, 3]), (3, [0, 1, 2])])
def test_remove_from_head_middle_and_tail(removed: int, expected: list[int]) -> None:
    blocks = make_blocks(4)
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[removed])
    queue.check_integrity()
    assert ids(queue) == expected
    assert blocks[removed] not in queue
    assert blocks[removed].prev_free is None and blocks[removed].next_free is None
    queue.append(blocks[removed])
    queue.check_integrity()
    assert ids(queue) == [*expected, removed]


def test_a_single_block_queue_empties_and_refills() -> None:
    (block,) = make_blocks(1)
    queue = FreeBlockQueue([block])
    assert block in queue
    assert queue.popleft() is block
    queue.check_integrity()
    assert len(queue) == 0 and ids(queue) == []
    assert block not in queue
    with pytest.raises(IndexError):
        queue.popleft()
    queue.append(block)
    queue.check_integrity()
    assert ids(queue) == [0]


def test_linking_a_block_twice_or_removing_an_absent_one_is_refused() -> None:
    blocks = make_blocks(2)
    queue = FreeBlockQueue(blocks[:1])
    with pytest.raises(AssertionError):
        queue.append(blocks[0])
    with pytest.raises(AssertionError):
        queue.remove(blocks[1])
    assert ids(queue) == [0]


def test_check_integrity_catches_a_broken_link() -> None:
    blocks = make_blocks(3)
    queue = FreeBlockQueue(blocks)
    blocks[2].prev_free = blocks[0]
    with pytest.raises(AssertionError, match="prev link"):
        queue.check_integrity()
