"""What the workloads write, and the checks of what the journals give back.

Every answer is compared with what was written: a journal that returns
something else raises ``WrongAnswer``, which the run reports as ``wrong``,
never as a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from casty import PersistedEvent, Snapshot

BASE_TS = 1_750_000_000.0


@dataclass(frozen=True)
class Deposited:
    """The event every workload persists: a small frozen dataclass, as casty's own are."""

    account: str
    amount: int


def event_of(entity_id: str, seq: int) -> PersistedEvent[Any]:
    return PersistedEvent(seq, Deposited(entity_id, seq), BASE_TS + seq / 1000)


def state_of(entity_id: str, seq: int) -> dict[str, Any]:
    """A snapshot state of about 300 bytes pickled."""
    return {
        "account": entity_id,
        "balance": seq * (seq + 1) // 2,
        "recent": list(range(seq, seq + 40)),
    }


class WrongAnswer(Exception):
    """A journal returned something other than what was stored."""


def check_events(entity_id: str, got: Sequence[PersistedEvent[Any]], first: int, last: int) -> None:
    """Raise ``WrongAnswer`` unless ``got`` is exactly events ``first..last`` of the entity."""
    if len(got) != last - first + 1:
        raise WrongAnswer(
            f"{entity_id!r}: expected {last - first + 1} events ({first}..{last}), got {len(got)}"
        )
    for expected_seq, item in zip(range(first, last + 1), got, strict=True):
        if item != event_of(entity_id, expected_seq):
            raise WrongAnswer(f"{entity_id!r}: event {expected_seq} came back as {item!r}")


def check_snapshot(entity_id: str, got: Snapshot[Any] | None, seq: int) -> None:
    if got is None:
        raise WrongAnswer(f"{entity_id!r}: snapshot {seq} is missing")
    if got.sequence_nr != seq or got.state != state_of(entity_id, seq):
        raise WrongAnswer(
            f"{entity_id!r}: expected its snapshot at {seq}, got one at {got.sequence_nr} "
            f"with state of {got.state.get('account') if isinstance(got.state, dict) else got}"
        )
