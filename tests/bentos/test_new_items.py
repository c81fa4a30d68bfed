"""The item journal: an item added while new engines are being built reaches them at the swap."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bentos.new_items import ItemJournal


class Engines:
    def __init__(self) -> None:
        self.items: list[int] = []

    def add_item(self, item: Mapping[str, Any]) -> str:
        self.items.append(int(item["item_id"]))
        return "mean of its category's vectors"


def test_an_item_added_during_a_build_reaches_the_new_engines() -> None:
    ticks = iter(range(100))
    journal = ItemJournal(clock=lambda: float(next(ticks)))
    served = {"engines": Engines()}
    journal.add(lambda: served["engines"], {"item_id": 1})  # at t=0, before the build: in the log
    since = journal.now()  # t=1: the build starts
    journal.add(lambda: served["engines"], {"item_id": 2})  # t=2, during the build
    new = Engines()
    replayed = journal.swap(new, since, lambda e: served.update(engines=e))
    # only item 2 was added after the build began; item 1 is the build's to replay from the log
    assert replayed == 1 and new.items == [2] and served["engines"] is new
    journal.add(lambda: served["engines"], {"item_id": 3})  # after the swap: the new engines directly
    assert new.items == [2, 3]


def test_the_journal_forgets_the_oldest_beyond_its_size() -> None:
    journal = ItemJournal(clock=lambda: 0.0, size=2)
    engines = Engines()
    for item in (1, 2, 3):
        journal.add(lambda: engines, {"item_id": item})
    new = Engines()
    assert journal.swap(new, 0.0, lambda _: None) == 2 and new.items == [2, 3]
