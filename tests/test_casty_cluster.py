"""Real casty clusters on 127.0.0.1 over SAJournal: failover, restarts, split brain.

Every node is a real ``ClusteredActorSystem`` in this process, talking to the
others over TCP; entities are real sharded ``Behaviors.event_sourced`` actors.
casty quirks worked around here (see ../shared/research, casty 0.21):

* every node calls ``wait_for(n)`` before spawning a sharded behaviour, or
  coordinators that have not yet seen every member allocate shards to
  themselves and run the same entity twice ("split allocation");
* the leader (node-0, the lowest port) spawns first: a coordinator created on
  the leader by a follower's message ignores ``ReplicationConfig``, so the
  shards of a failed node are dropped instead of moved to a replica;
* after a node stops, requests go through the leader (the lowest port, which
  is never the node stopped), since gossip can "revive" a dead node and a
  follower's cached route to it is then never evicted;
* the SQLite journals of one process are started one after the other (this
  once worked around concurrent first-use migrations interfering; fixed since,
  see ``test_journals_starting_at_once_each_migrate_their_own_database``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from casty import (
    Behaviors,
    ClusteredActorSystem,
    JournalKind,
    PersistedEvent,
    ReplicateEvents,
    ReplicationConfig,
    ShardEnvelope,
    Snapshot,
    SnapshotEvery,
)
from sqlalchemy import URL, select

from casty_sa import EventRecord, SAJournal, SequenceConflict
from casty_sa.replication import DEFAULT_REGION_NAME, LocalReplication

from bank_account import Account, Deposit, Deposited, GetBalance, apply
from support.processes import free_ports

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
TEST_TIMEOUT = 60.0
ENTITIES = [f"acct-{i}" for i in range(12)]


# -- the example's account, replying with the balance its node sees -----------------------------


@dataclass(frozen=True)
class Confirm:
    """Told to itself by a depositing account: handled once the deposit is stored."""

    reply_to: Any


@dataclass(frozen=True)
class Balance:
    node: str
    balance: int
    version: int


def account_factory(
    node: str,
    journal: Any,
    replication: LocalReplication | None = None,
    snapshot_every: int = 4,
) -> Callable[[str], Any]:
    """Entity factory of one node: its journal, and its replicas if any."""

    def factory(entity_id: str) -> Any:
        async def on_command(ctx: Any, account: Account, command: Any) -> Any:
            match command:
                case Deposit(amount, reply_to):
                    # casty replies from on_command before persisting; this reply waits
                    # until the persist call returned, so an acknowledged deposit is stored
                    ctx.self.tell(Confirm(reply_to))
                    return Behaviors.persisted([Deposited(amount)])
                case GetBalance(reply_to) | Confirm(reply_to):
                    reply_to.tell(Balance(node, account.balance, account.version))
                    return Behaviors.same()
            return Behaviors.unhandled()

        return Behaviors.event_sourced(
            entity_id=entity_id,
            journal=journal,
            initial_state=Account(),
            on_event=apply,
            on_command=on_command,
            snapshot_policy=SnapshotEvery(n_events=snapshot_every),
            replica_refs=replication.refs() if replication is not None else (),
        )

    return factory


# -- a journal that notes what casty did with it -------------------------------------------------


@dataclass
class Recorder:
    """The EventJournal protocol over a real SAJournal, noting calls and their outcome."""

    journal: SAJournal
    persists: list[tuple[str, list[int]]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    kind_reads: int = 0
    failed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def kind(self) -> JournalKind:
        # casty reads `kind` in one place: its replica region, once per ReplicateEvents
        self.kind_reads += 1
        return self.journal.kind

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        self.persists.append((entity_id, [e.sequence_nr for e in events]))
        try:
            await self.journal.persist(entity_id, events)
        except BaseException as exc:
            self.failures.append(exc)
            self.failed.set()
            raise

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        self.loaded.append(entity_id)
        return await self.journal.load(entity_id, from_sequence_nr)

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        await self.journal.save_snapshot(entity_id, snapshot)

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        return await self.journal.load_snapshot(entity_id)


# -- nodes and clusters ------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    system: Any
    journal: Any
    replication: LocalReplication | None = None
    accounts: Any = None
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.system.shutdown()

    async def ask(self, entity_id: str, make: Callable[[Any], Any], seconds: float = 5.0) -> Any:
        return await self.system.ask(
            self.accounts, lambda r: ShardEnvelope(entity_id, make(r)), timeout=seconds
        )

    async def deposit(self, entity_id: str, amount: int, seconds: float = 5.0) -> Balance:
        reply: Balance = await self.ask(entity_id, lambda r: Deposit(amount, r), seconds)
        return reply

    async def balance(self, entity_id: str, seconds: float = 5.0) -> Balance:
        reply: Balance = await self.ask(entity_id, GetBalance, seconds)
        return reply

    async def served(self, entity_id: str, deadline: float = 20.0) -> Balance:
        """The entity's balance once it answers again (after a failover)."""
        give_up = time.monotonic() + deadline
        while True:
            try:
                return await self.balance(entity_id, seconds=1.0)
            except TimeoutError:
                if time.monotonic() > give_up:
                    raise


async def start_cluster(
    stack: AsyncExitStack,
    journals: Sequence[Any],
    *,
    replicate: bool,
    seed_all: bool = True,
) -> list[Node]:
    """One node per journal, converged, each with the sharded ``accounts`` spawned."""
    ports = free_ports(len(journals))
    seeds = tuple((HOST, port) for port in ports)
    nodes = []
    for i, (port, journal) in enumerate(zip(ports, journals, strict=True)):
        system = ClusteredActorSystem(
            name="bank",
            host=HOST,
            port=port,
            node_id=f"node-{i}",
            seed_nodes=seeds if seed_all else ((HOST, port),),
        )
        await stack.enter_async_context(system)
        node = Node(f"node-{i}", system, journal)
        stack.push_async_callback(node.stop)
        nodes.append(node)
    # converge first: sharded behaviours spawned earlier allocate shards twice
    expected = len(nodes) if seed_all else 1
    await asyncio.gather(*(node.system.wait_for(expected, timeout=20) for node in nodes))
    if seed_all:
        state = await nodes[0].system.get_cluster_state()
        assert state.leader == nodes[0].system.self_node
    # the leader (node-0) spawns first: a coordinator that a follower's message creates on
    # the leader before the leader's own spawn ignores ReplicationConfig (casty 0.21)
    for node in nodes:
        if replicate:
            node.replication = await LocalReplication.start(node.system, node.journal)
        node.accounts = node.system.spawn(
            Behaviors.sharded(
                account_factory(node.name, node.journal, node.replication),
                num_shards=30,
                replication=ReplicationConfig(replicas=len(nodes) - 1),
            ),
            "accounts",
        )
    # a first request through each proxy follows that node's region registration to the
    # leader, so no account is placed before every node can take some
    for node in nodes:
        await node.balance(f"probe-{node.name}")
    return nodes


async def deposit_rounds(via: Node, rounds: int, base: int) -> dict[str, str]:
    """Deposit ``base + round`` into every account; the node owning each at the end."""
    owners = {}
    for r in range(rounds):
        for entity_id in ENTITIES:
            owners[entity_id] = (await via.deposit(entity_id, base + r)).node
    return owners


async def stored_rows(journal: SAJournal) -> dict[str, list[int]]:
    """Every stored (entity, sequence number), straight from the table."""
    rows: dict[str, list[int]] = {}
    statement = select(EventRecord.entity_id, EventRecord.sequence_nr).order_by(
        EventRecord.entity_id, EventRecord.sequence_nr
    )
    async with journal.engine.connect() as connection:
        for entity_id, seq in await connection.execute(statement):
            rows.setdefault(entity_id, []).append(seq)
    return rows


async def wait_until(check: Callable[[], Awaitable[bool]], deadline: float = 10.0) -> None:
    give_up = time.monotonic() + deadline
    while not await check():
        assert time.monotonic() < give_up, "condition not reached in time"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def bounded(seconds: float = TEST_TIMEOUT) -> AsyncIterator[AsyncExitStack]:
    """An exit stack for systems, closed even when the test fails or runs out of time."""
    async with AsyncExitStack() as stack, asyncio.timeout(seconds):
        yield stack


def victim_of(nodes: Sequence[Node], owners: dict[str, str]) -> Node:
    """A node other than the leader that owns some accounts."""
    owning = {owner for owner in owners.values()}
    candidates = [node for node in nodes[1:] if node.name in owning]
    assert candidates, f"the leader owns every account: {owners}"
    return candidates[0]


# -- centralized: one PostgreSQL database for the whole cluster ---------------------------------


async def test_centralized_cluster_fails_over_and_restarts_with_one_row_per_event(
    new_postgres_db: Callable[..., Awaitable[URL]], make_journal: Callable[..., SAJournal]
) -> None:
    db = await new_postgres_db()
    expected = {entity_id: 0 for entity_id in ENTITIES}
    async with bounded() as stack:
        journals = [Recorder(make_journal(db)) for _ in range(3)]
        nodes = await start_cluster(stack, journals, replicate=True)
        leader = nodes[0]
        owners = await deposit_rounds(leader, rounds=3, base=10)
        for entity_id in ENTITIES:
            expected[entity_id] += 10 + 11 + 12
        victim = victim_of(nodes, owners)
        moved = [entity_id for entity_id, owner in owners.items() if owner == victim.name]

        await victim.stop()
        for entity_id in moved:
            recovered = await leader.served(entity_id)
            assert recovered.node != victim.name
            assert (recovered.balance, recovered.version) == (expected[entity_id], 3)
        await deposit_rounds(leader, rounds=2, base=100)
        for entity_id in ENTITIES:
            expected[entity_id] += 100 + 101
            reply = await leader.balance(entity_id)
            assert (reply.balance, reply.version) == (expected[entity_id], 5)

        # exactly one row per event: replicas got the batches but stored nothing
        rows = await stored_rows(journals[0].journal)
        assert rows == {entity_id: [1, 2, 3, 4, 5] for entity_id in ENTITIES}
        attempts = [seqs for journal in journals for _, seqs in journal.persists]
        assert len(attempts) == len(ENTITIES) * 5
        assert all(not journal.failures for journal in journals)
        # and they did get them: casty's replica region reads `kind` once per batch received
        # (36 batches before the stop, each sent to two live replicas)
        assert sum(journal.kind_reads for journal in journals) >= 2 * 36
        for node in nodes:
            await node.stop()

    async with bounded() as stack:  # the whole cluster again, on fresh journals
        journals = [Recorder(make_journal(db)) for _ in range(3)]
        nodes = await start_cluster(stack, journals, replicate=True)
        for entity_id in ENTITIES:
            reply = await nodes[0].balance(entity_id)
            assert (reply.balance, reply.version) == (expected[entity_id], 5)
        reply = await nodes[0].deposit(ENTITIES[0], 1)
        assert (reply.balance, reply.version) == (expected[ENTITIES[0]] + 1, 6)
        assert (await stored_rows(journals[0].journal))[ENTITIES[0]] == [1, 2, 3, 4, 5, 6]


# -- local: one SQLite file per node, replicas wired by casty_sa.replication ---------------------


async def test_local_cluster_survivor_recovers_from_its_own_file(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    async with bounded() as stack:
        journals = [
            Recorder(make_journal(f"sqlite:///{tmp_path / f'node-{i}.db'}")) for i in range(3)
        ]
        for journal in journals:  # one at a time: see the module docstring
            await journal.journal.start()
        nodes = await start_cluster(stack, journals, replicate=True)
        assert all(len(node.replication.peers) == 2 for node in nodes if node.replication)
        leader = nodes[0]
        owners = await deposit_rounds(leader, rounds=3, base=10)

        async def every_file_has(n: int, among: Sequence[Recorder]) -> bool:
            for journal in among:
                rows = await stored_rows(journal.journal)
                if any(rows.get(entity_id) != list(range(1, n + 1)) for entity_id in ENTITIES):
                    return False
            return True

        # while every node is up, every file receives every event (in order)
        await wait_until(lambda: every_file_has(3, journals))

        victim = victim_of(nodes, owners)
        moved = [entity_id for entity_id, owner in owners.items() if owner == victim.name]
        survivors = [node for node in nodes if node is not victim]
        await victim.stop()
        for entity_id in moved:
            recovered = await leader.served(entity_id)
            assert (recovered.balance, recovered.version) == (10 + 11 + 12, 3)
            new_owner = next(node for node in survivors if node.name == recovered.node)
            assert entity_id in new_owner.journal.loaded  # read from the new owner's own file
        await deposit_rounds(leader, rounds=1, base=100)
        for entity_id in ENTITIES:
            reply = await leader.balance(entity_id)
            assert (reply.balance, reply.version) == (10 + 11 + 12 + 100, 4)
        await wait_until(lambda: every_file_has(4, [node.journal for node in survivors]))

        # what the local kind cannot do: the stopped node's file missed event 4 for good
        missed = await stored_rows(victim.journal.journal)
        assert missed == {entity_id: [1, 2, 3] for entity_id in ENTITIES}


async def test_local_replica_skips_a_conflicting_batch_and_keeps_replicating(
    tmp_path: Path, make_journal: Callable[..., SAJournal], caplog: pytest.LogCaptureFixture
) -> None:
    # casty's own replica region stops for good on its first failed persist; the one
    # LocalReplication starts logs the batch it cannot store and goes on with the next
    journal = make_journal(f"sqlite:///{tmp_path / 'replica.db'}")
    async with bounded() as stack:
        system = await stack.enter_async_context(
            ClusteredActorSystem(name="bank", host=HOST, port=0, node_id="replica")
        )
        await LocalReplication.start(system, journal)
        region = system.lookup(f"/{DEFAULT_REGION_NAME}")

        def batch(*events: tuple[int, str]) -> ReplicateEvents:
            persisted = tuple(PersistedEvent(seq, event, 1.0) for seq, event in events)
            return ReplicateEvents(entity_id="acct", shard_id=0, events=persisted)

        region.tell(batch((1, "first"), (2, "second")))
        region.tell(batch((2, "forked"), (3, "forked")))  # 2 is already stored: skipped whole
        region.tell(batch((3, "third")))

        async def third_stored() -> bool:
            return len(await journal.load("acct")) == 3

        await wait_until(third_stored)
        assert [(e.sequence_nr, e.event) for e in await journal.load("acct")] == [
            (1, "first"),
            (2, "second"),
            (3, "third"),
        ]
        assert "sequence number 2 is already in this node's journal" in caplog.text


# -- split brain: two systems that do not know each other, one database --------------------------


async def test_split_brain_second_writer_conflicts_and_catches_up(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    async with bounded() as stack:
        journals = [Recorder(make_journal(db_url)) for _ in range(2)]
        left, right = await start_cluster(stack, journals, replicate=False, seed_all=False)
        entity = "acct-shared"
        assert (await left.balance(entity)).version == 0  # both sides activate at seq 0
        assert (await right.balance(entity)).version == 0

        assert (await left.deposit(entity, 10)).balance == 10  # seq 1
        with pytest.raises(TimeoutError):  # right also writes seq 1: refused, no reply
            await right.deposit(entity, 5, seconds=1.0)
        [conflict] = journals[1].failures
        assert isinstance(conflict, SequenceConflict) and conflict.sequence_nr == 1

        caught_up = await right.served(entity)  # re-activated from the journal
        assert (caught_up.balance, caught_up.version) == (10, 1)
        assert (await right.deposit(entity, 5)).balance == 15  # seq 2
        with pytest.raises(TimeoutError):  # now left is the stale one
            await left.deposit(entity, 1, seconds=1.0)
        [conflict] = journals[0].failures
        assert isinstance(conflict, SequenceConflict) and conflict.sequence_nr == 2
        assert (await left.served(entity)).balance == 15
        assert (await left.deposit(entity, 1)).balance == 16  # seq 3

        # one history: no fork, no lost acknowledged deposit, no duplicate
        history = await journals[0].journal.load(entity)
        assert [(e.sequence_nr, e.event) for e in history] == [
            (1, Deposited(10)),
            (2, Deposited(5)),
            (3, Deposited(1)),
        ]
        assert (await left.balance(entity)) == Balance(left.name, 16, 3)
        # the side that lost the last race keeps serving its stale state until its next
        # write conflicts in turn (casty has no passivation): the journal cannot reach it
        assert (await right.balance(entity)) == Balance(right.name, 15, 2)


# -- casty's distributed data structures, persisted through SAJournal ---------------------------


async def test_distributed_counter_and_map_survive_a_restart(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    async def session(journal: SAJournal) -> tuple[Any, Any, AsyncExitStack]:
        stack = AsyncExitStack()
        system = await stack.enter_async_context(
            ClusteredActorSystem(name="data", host=HOST, port=0, node_id="solo")
        )
        await system.wait_for(1, timeout=10)
        structures = system.distributed(journal=journal)
        return structures.counter("hits"), structures.map[str, str]("prefs"), stack

    async with asyncio.timeout(TEST_TIMEOUT):
        hits, prefs, stack = await session(make_journal(db_url))
        async with stack:
            assert await hits.increment(5) == 5
            assert await hits.increment(3) == 8
            assert await hits.decrement(2) == 6
            assert await prefs.put("alice", "dark") is None
            assert await prefs.put("bob", "light") is None
            assert await prefs.put("alice", "solarized") == "dark"
            assert await prefs.delete("bob") is True
            # casty replies before persisting: a read behind the writes lets them finish
            assert await hits.get() == 6
            assert await prefs.get("alice") == "solarized"
            assert await prefs.get("bob") is None

        journal = make_journal(db_url)
        assert len(await journal.load("hits")) == 3
        assert len(await journal.load("prefs:alice")) == 2
        hits, prefs, stack = await session(journal)
        async with stack:
            assert await hits.get() == 6
            assert await prefs.get("alice") == "solarized"
            assert await prefs.get("bob") is None
            assert await prefs.contains("bob") is False
            assert await hits.increment(4) == 10
            assert await hits.get() == 10
        assert [e.sequence_nr for e in await journal.load("hits")] == [1, 2, 3, 4]
