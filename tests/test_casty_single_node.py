"""casty's event-sourced actors on SAJournal, one node, on every backend.

A bank account runs as a real ``Behaviors.event_sourced`` actor in a real
``ActorSystem``; the system is stopped and a new one, on a new journal over the
same database, must recover the state and the sequence numbers exactly, from
the latest snapshot plus the events after it. The example script is run the
same way, as a user would.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import Any

from casty import ActorSystem, Behaviors, PersistedEvent, Snapshot, SnapshotEvery
from sqlalchemy import URL

from casty_sa import SAJournal

import bank_account as bank
from bank_account import Account, Deposit, Deposited, GetBalance, Withdrawn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bank_account.py"
TIMEOUT = 30.0


# -- the account: the example's, with a fee charged on each withdrawal --------------------------


@dataclass(frozen=True)
class FeeCharged:
    amount: int


def apply(account: Account, event: Any) -> Account:
    if isinstance(event, FeeCharged):
        return bank.apply(account, Withdrawn(event.amount))
    if isinstance(event, Deposited | Withdrawn):
        return bank.apply(account, event)
    raise TypeError(f"unknown event {event!r}")


@dataclass(frozen=True)
class Withdraw:
    """The example's withdrawal, plus a fee: two events in one persist call."""

    amount: int
    fee: int
    reply_to: Any = None


def account_behavior(entity_id: str, journal: Any, snapshot_every: int) -> Any:
    async def on_command(ctx: Any, account: Account, command: Any) -> Any:
        match command:
            case Deposit(amount, reply_to):
                reply_to.tell(account.balance + amount)
                return Behaviors.persisted([Deposited(amount)])
            case Withdraw(amount, fee, reply_to) if amount + fee <= account.balance:
                reply_to.tell(account.balance - amount - fee)
                return Behaviors.persisted([Withdrawn(amount), FeeCharged(fee)])  # one batch
            case Withdraw(_, _, reply_to):
                reply_to.tell(None)
                return Behaviors.persisted([])  # casty still calls persist, with no events
            case GetBalance(reply_to):
                reply_to.tell(account)
                return Behaviors.same()
        return Behaviors.unhandled()

    return Behaviors.event_sourced(
        entity_id=entity_id,
        journal=journal,
        initial_state=Account(),
        on_event=apply,
        on_command=on_command,
        snapshot_policy=SnapshotEvery(n_events=snapshot_every),
    )


# -- what casty asked of the journal -------------------------------------------------------------


@dataclass
class Recorder:
    """The EventJournal protocol over a real SAJournal, noting each call's effect."""

    journal: SAJournal
    persisted: list[list[int]] = field(default_factory=list)
    snapshots_saved: list[Snapshot[Any]] = field(default_factory=list)
    snapshots_loaded: list[Snapshot[Any] | None] = field(default_factory=list)
    loads: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def kind(self) -> Any:
        return self.journal.kind

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        await self.journal.persist(entity_id, events)
        self.persisted.append([e.sequence_nr for e in events])

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        events = await self.journal.load(entity_id, from_sequence_nr)
        self.loads.append((from_sequence_nr, [e.sequence_nr for e in events]))
        return events

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        await self.journal.save_snapshot(entity_id, snapshot)
        self.snapshots_saved.append(snapshot)

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        snapshot = await self.journal.load_snapshot(entity_id)
        self.snapshots_loaded.append(snapshot)
        return snapshot


async def run_commands(recorder: Recorder, commands: Sequence[Any], snapshot_every: int) -> Account:
    """One system's life: start, send ``commands``, read the state, stop."""
    async with asyncio.timeout(TIMEOUT), ActorSystem(name="bank") as system:
        ref = system.spawn(account_behavior("acct-1", recorder, snapshot_every), "acct-1")
        for command in commands:
            await system.ask(ref, lambda r, c=command: replace(c, reply_to=r), timeout=5)
        state: Account = await system.ask(ref, GetBalance, timeout=5)
        return state


# -- tests -----------------------------------------------------------------------------------


async def test_recovery_resumes_from_latest_snapshot_and_replays_the_rest(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    commands = [
        Deposit(100, None),
        Withdraw(30, fee=1),  # two events in one persist call
        Deposit(7, None),
        Withdraw(1000, fee=1),  # refused: an empty persist call
        Deposit(12, None),
        Withdraw(5, fee=2),
        Deposit(3, None),
    ]
    first = Recorder(make_journal(db_url))
    before = await run_commands(first, commands, snapshot_every=3)
    assert before == Account(balance=100 - 31 + 7 + 12 - 7 + 3, version=8)
    assert first.persisted == [[1], [2, 3], [4], [], [5], [6, 7], [8]]
    assert [s.sequence_nr for s in first.snapshots_saved] == [3, 7]
    stored = await first.journal.load("acct-1")
    assert [e.sequence_nr for e in stored] == list(range(1, 9))
    await first.journal.close()

    second = Recorder(make_journal(db_url))  # a new journal: nothing cached in memory
    after = await run_commands(second, [Deposit(50, None)], snapshot_every=3)

    # recovery read the newest snapshot, then only the events after it
    [snapshot] = second.snapshots_loaded
    assert snapshot is not None
    assert (snapshot.sequence_nr, snapshot.state) == (7, first.snapshots_saved[-1].state)
    assert snapshot.state == reduce(apply, [e.event for e in stored[:7]], Account())
    assert second.loads == [(8, [8])]  # one event replayed
    # sequence numbers continue exactly where the first system stopped
    assert second.persisted == [[9]]
    assert after == Account(balance=before.balance + 50, version=9)
    stored = await second.journal.load("acct-1")
    assert [e.sequence_nr for e in stored] == list(range(1, 10))
    assert reduce(apply, [e.event for e in stored], Account()) == after


async def test_recovery_without_a_snapshot_replays_every_event(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    first = Recorder(make_journal(db_url))
    before = await run_commands(first, [Deposit(5, None), Withdraw(2, fee=1)], snapshot_every=100)
    assert first.snapshots_saved == []

    second = Recorder(make_journal(db_url))
    after = await run_commands(second, [], snapshot_every=100)
    assert second.snapshots_loaded == [None]
    assert second.loads == [(1, [1, 2, 3])]
    assert after == before == Account(balance=2, version=3)


async def run_example(url: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--url",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_example_recovers_its_account_on_the_second_run(db_url: URL) -> None:
    url = db_url.render_as_string(hide_password=False)
    first = await run_example(url)
    assert first.splitlines()[0] == "recovered: nothing stored yet, new account (balance 0)"
    final = re.search(r"^final: balance (\d+) at seq (\d+)$", first, re.M)
    assert final is not None, first

    second = await run_example(url)
    recovered = re.match(
        r"recovered: balance (\d+) at seq (\d+) \(snapshot at seq (\d+), (\d+) events replayed\)",
        second,
    )
    assert recovered is not None, second
    balance, seq, snapshot_seq, replayed = map(int, recovered.groups())
    assert (balance, seq) == tuple(map(int, final.groups()))
    assert 0 < snapshot_seq < seq
    assert snapshot_seq + replayed == seq
