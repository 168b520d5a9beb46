"""A casty cluster of separate OS processes on one PostgreSQL journal: kill -9 the owner.

Three processes run ``tests/support/cluster_node.py``; the first (the leader: lowest
port) also drives deposits into a set of accounts. While they flow, the test
kills another node with SIGKILL. Its accounts must come back on the survivors
with their full history, and every deposit whose acknowledgement reached the
client must be in the journal, at the sequence number it was acknowledged
with. The nodes acknowledge a deposit only after its ``persist`` returned.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import URL

from casty_sa import SAJournal

from support.processes import CLUSTER_NODE, free_ports

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
ENTITIES = 8


@dataclass(frozen=True)
class Ack:
    entity: str
    command: int
    node: str
    sequence_nr: int


@dataclass
class NodeProcess:
    """One node's process and what it printed so far."""

    name: str
    process: asyncio.subprocess.Process
    stderr: Path
    lines: list[str] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    lost: set[int] = field(default_factory=set)
    ended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self) -> None:
        """Collect the node's output lines until its stdout closes."""
        assert self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            line = raw.decode().strip()
            self.lines.append(line)
            match line.split():
                case ["ACK", entity, command, node, seq]:
                    self.acks.append(Ack(entity, int(command), node, int(seq)))
                case ["LOST", _, command]:
                    self.lost.add(int(command))
            self.changed.set()
        self.ended = True
        self.changed.set()

    async def until(self, condition: Callable[[], bool], seconds: float) -> None:
        """Wait for ``condition`` over the printed lines; fail with the node's stderr."""
        try:
            async with asyncio.timeout(seconds):
                while not condition():
                    if self.ended:
                        raise AssertionError("its output ended")
                    self.changed.clear()
                    await self.changed.wait()
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(
                f"{self.name}: {exc!r}; printed {self.lines[-5:]}; stderr:\n"
                + self.stderr.read_text()[-3000:]
            ) from exc

    def printed(self, text: str) -> Callable[[], bool]:
        return lambda: text in self.lines

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())


@asynccontextmanager
async def cluster(url: str, tmp_path: Path, size: int) -> AsyncIterator[list[NodeProcess]]:
    """``size`` node processes; the first drives deposits. All are gone on exit."""
    ports = free_ports(size)
    nodes: list[NodeProcess] = []
    followers: list[asyncio.Task[None]] = []
    try:
        for i, port in enumerate(ports):
            name = f"node-{i}"
            stderr = tmp_path / f"{name}.stderr"
            with stderr.open("wb") as err:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(CLUSTER_NODE),
                    "--node-id",
                    name,
                    "--port",
                    str(port),
                    "--seeds",
                    ",".join(map(str, ports)),
                    "--url",
                    url,
                    "--entities",
                    str(ENTITIES),
                    *(["--client"] if i == 0 else []),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                )
            node = NodeProcess(name, process, stderr)
            nodes.append(node)
            followers.append(asyncio.create_task(node.follow()))
        yield nodes
    finally:
        for node in nodes:
            if node.process.returncode is None:
                node.process.kill()
        for node in nodes:
            with suppress(ProcessLookupError):
                await asyncio.wait_for(node.process.wait(), timeout=10)
        for task in followers:
            task.cancel()


async def test_kill_9_of_an_owner_loses_no_acknowledged_deposit(
    tmp_path: Path,
    new_postgres_db: Callable[..., Awaitable[URL]],
    make_journal: Callable[..., SAJournal],
) -> None:
    # the nodes' journals run on psycopg (the cluster test runs asyncpg): a SIGKILL mid-traffic
    # loses no acknowledged deposit on either driver
    db = (await new_postgres_db()).set(drivername="postgresql+psycopg")
    async with (
        asyncio.timeout(90),
        cluster(db.render_as_string(hide_password=False), tmp_path, size=3) as nodes,
    ):
        client = nodes[0]
        for node in nodes:
            await node.until(node.printed("READY"), seconds=40)
        client.send("go")

        # wait until every account acknowledged a few deposits, and see who owns which
        def acked_everywhere(n: int) -> bool:
            counts = Counter(ack.entity for ack in client.acks)
            return len(counts) == ENTITIES and min(counts.values()) >= n

        await client.until(lambda: acked_everywhere(3), seconds=30)
        owners = {ack.entity: ack.node for ack in client.acks}
        by_node = Counter(owners.values())
        victim = max(nodes[1:], key=lambda node: by_node[node.name])
        moved = {entity for entity, owner in owners.items() if owner == victim.name}
        assert moved, f"no account on {victim.name}: {owners}"

        victim.process.kill()  # SIGKILL: no shutdown, no flush, mid-traffic
        await victim.process.wait()
        killed_at = len(client.acks)

        # every account the victim owned is served again, by a survivor
        def taken_over() -> bool:
            after = client.acks[killed_at:]
            return moved <= {a.entity for a in after if a.node != victim.name}

        started = time.monotonic()
        await client.until(taken_over, seconds=30)
        takeover_seconds = time.monotonic() - started
        await asyncio.sleep(0.3)  # a little more traffic on the new owners
        client.send("stop")
        await client.until(client.printed("DONE"), seconds=15)
        for node in nodes[1:]:
            if node.process.returncode is None:
                node.send("stop")
        for node in nodes:
            await asyncio.wait_for(node.process.wait(), timeout=15)

    acks = client.acks
    for entity in moved:  # the survivors went on from the victim's last event, not from zero
        last_on_victim = max(
            a.sequence_nr for a in acks if a.entity == entity and a.node == victim.name
        )
        first_after = min(
            a.sequence_nr for a in acks[killed_at:] if a.entity == entity and a.node != victim.name
        )
        assert first_after > last_on_victim
    journal = make_journal(db)
    for i in range(ENTITIES):
        entity = f"acct-{i}"
        history = await journal.load(entity)
        seqs = [e.sequence_nr for e in history]
        assert seqs == list(range(1, len(seqs) + 1)), f"{entity}: gap or disorder {seqs}"
        stored = {e.sequence_nr: e.event[1] for e in history}
        commands = list(stored.values())
        assert len(commands) == len(set(commands)), f"{entity}: a command stored twice"
        entity_acks = [a for a in acks if a.entity == entity]
        for ack in entity_acks:  # acknowledged => stored, at the acknowledged position
            assert stored.get(ack.sequence_nr) == ack.command, (entity, ack)
        # anything stored was sent: acknowledged, or lost in flight when the owner died
        assert set(commands) <= {a.command for a in entity_acks} | client.lost
    assert takeover_seconds < 25
