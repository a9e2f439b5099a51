"""Live capacity streams: one key cannot hold every slot of a process (review of issue 13)."""

from __future__ import annotations

import pytest

from api.problems import Problem
from api.routes.vpp import StreamSlots

pytestmark = pytest.mark.unit


def test_a_key_holds_at_most_its_share_and_others_still_get_a_stream() -> None:
    slots = StreamSlots(total=6, per_key=4)
    greedy = [slots.take("greedy") for _ in range(4)]
    with pytest.raises(Problem) as refused:
        slots.take("greedy")
    assert refused.value.status == 429
    other = slots.take("other")
    slots.release(greedy[0])
    slots.take("greedy")
    slots.take("third")
    with pytest.raises(Problem) as full:
        slots.take("fourth")
    assert full.value.status == 503
    slots.release(other)


def test_a_slot_released_twice_frees_it_once() -> None:
    """The stream's end and the response's end both release: the second must not free another's slot."""
    slots = StreamSlots(total=2, per_key=2)
    a = slots.take("k")
    slots.take("k")
    slots.release(a)
    slots.release(a)
    slots.take("k")
    with pytest.raises(Problem):
        slots.take("k")
