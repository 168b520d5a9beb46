"""W7: casty end to end: event-sourced casty entities receiving commands at once.

A real ``ActorSystem`` runs ``Behaviors.event_sourced`` accounts on the
journal under test. Each entity is spawned and recovered first (untimed);
then a client per entity sends it commands one after another, each a
``system.ask`` whose reply leaves only after the command's event is stored
(the account tells itself to confirm, as ``examples/bank_account.py`` does:
casty handles that message after ``persist`` returned). The rate is commands
per second over all entities; p50/p99 are each ask's round trip. Afterwards
every entity's events are read back and checked, and every reply too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from casty import ActorSystem, Behaviors

from .base import Row, Sample, Sizes, Workload, sample
from .data import WrongAnswer
from .journals import Journal


@dataclass(frozen=True)
class Credited:
    """The event: an amount credited to the entity."""

    amount: int


@dataclass(frozen=True)
class Credit:
    amount: int
    reply_to: Any


@dataclass(frozen=True)
class Balance:
    reply_to: Any


@dataclass(frozen=True)
class _Stored:
    """Told to itself by the handler; handled once the command's event is stored."""

    reply_to: Any
    balance: int


def _behavior(entity_id: str, journal: Journal) -> Any:
    async def on_command(ctx: Any, balance: int, command: Any) -> Any:
        match command:
            case Credit(amount, reply_to):
                ctx.self.tell(_Stored(reply_to, balance + amount))
                return Behaviors.persisted([Credited(amount)])
            case Balance(reply_to):
                reply_to.tell(balance)
                return Behaviors.same()
            case _Stored(reply_to, after):
                reply_to.tell(after)
                return Behaviors.same()
        return Behaviors.unhandled()

    def on_event(balance: int, event: Credited) -> int:
        return balance + event.amount

    return Behaviors.event_sourced(
        entity_id=entity_id,
        journal=journal,
        initial_state=0,
        on_event=on_event,
        on_command=on_command,
    )


_systems = itertools.count()
#: seconds an ask may take: far beyond any answer, so a lost one fails the run, not hangs it
_ASK_TIMEOUT = 30.0


class W7(Workload):
    key = "W7"
    #: casty-sa on SQLite and PostgreSQL against casty's own journals
    journals = frozenset({"sa-sqlite", "sa-postgresql", "casty-memory", "casty-sqlite"})

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w7_entities
        self.commands = sizes.w7_commands
        self.rows = (
            Row(
                "W7",
                "commands/s",
                f"casty end to end: {self.entities:,} event-sourced entities in an ActorSystem, "
                f"{self.commands} commands each, one client per entity (ask, reply once stored)",
            ),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        ids = [f"w7-{i:05d}" for i in range(self.entities)]
        clock = time.perf_counter
        latencies: list[float] = []
        replies: dict[str, list[int]] = {entity: [] for entity in ids}
        async with ActorSystem(name=f"bench-w7-{next(_systems)}") as system:
            # spawning and recovery (an empty load each) are not part of the figure, and go
            # one entity at a time: casty's SqliteJournal answers concurrent loads wrongly
            # (see W5)
            refs = {}
            for entity in ids:
                refs[entity] = system.spawn(_behavior(entity, journal), entity)
                await system.ask(refs[entity], Balance, timeout=_ASK_TIMEOUT)

            async def client(entity: str) -> None:
                ref = refs[entity]
                for amount in range(1, self.commands + 1):
                    t = clock()
                    reply = await system.ask(
                        ref, lambda r, a=amount: Credit(a, r), timeout=_ASK_TIMEOUT
                    )
                    latencies.append(clock() - t)
                    replies[entity].append(reply)

            start = clock()
            await asyncio.gather(*(client(entity) for entity in ids))
            elapsed = clock() - start
        await _check(journal, replies, self.commands)
        return {"W7": sample(self.entities * self.commands, elapsed, latencies)}


async def _check(journal: Journal, replies: dict[str, list[int]], commands: int) -> None:
    """Every reply is the running total; every entity's events are 1..n, as sent."""
    expected_replies = list(itertools.accumulate(range(1, commands + 1)))
    for entity, got in replies.items():
        if got != expected_replies:
            raise WrongAnswer(f"{entity!r}: replies {got[:5]}…, expected {expected_replies[:5]}…")
        events = await journal.load(entity)
        numbers = [e.sequence_nr for e in events]
        amounts = [e.event.amount if isinstance(e.event, Credited) else None for e in events]
        if numbers != list(range(1, commands + 1)) or amounts != numbers:
            raise WrongAnswer(f"{entity!r}: stored {numbers[:5]}… with amounts {amounts[:5]}…")
