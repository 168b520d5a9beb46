"""One casty cluster node in its own OS process, for tests/test_casty_processes.py.

Run as ``python tests/support/cluster_node.py --node-id node-0 --port 25520 --seeds 25520,25521
--url postgresql://… [--client]``. The node joins the cluster, waits until every
seed is up, spawns the sharded ``accounts`` (event-sourced, stored by an
``SAJournal`` on ``--url``) and prints ``READY``. It then runs until stdin closes,
``stop`` is read from stdin, or SIGTERM.

With ``--client`` the node also drives traffic once it reads ``go``: one task
per account deposits with a unique command id, one command at a time, and
prints one line per command:

* ``ACK <entity> <command> <owner node> <sequence nr>`` once the owner stored it,
* ``LOST <entity> <command>`` when no reply came in time (stored or not).

Events are plain tuples, so any process can read the journal back.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from casty import (
    Behaviors,
    ClusteredActorSystem,
    ReplicationConfig,
    ShardEnvelope,
    SnapshotEvery,
)

from casty_sa import SAJournal

HOST = "127.0.0.1"

#: (balance, version): version is the sequence number of the last event applied
type State = tuple[int, int]
#: ("deposited", command id, amount)
type Event = tuple[str, int, int]


@dataclass(frozen=True)
class Deposit:
    command: int
    amount: int
    reply_to: Any


@dataclass(frozen=True)
class Confirm:
    """Handled only after the deposit's persist call returned."""

    command: int
    sequence_nr: int
    reply_to: Any


@dataclass(frozen=True)
class Ping:
    reply_to: Any


@dataclass(frozen=True)
class Ack:
    command: int
    node: str
    sequence_nr: int


def apply(state: State, event: Event) -> State:
    _, _, amount = event
    return (state[0] + amount, state[1] + 1)


def account_factory(node: str, journal: SAJournal) -> Any:
    def factory(entity_id: str) -> Any:
        async def on_command(ctx: Any, state: State, command: Any) -> Any:
            match command:
                case Deposit(command_id, amount, reply_to):
                    ctx.self.tell(Confirm(command_id, state[1] + 1, reply_to))
                    return Behaviors.persisted([("deposited", command_id, amount)])
                case Confirm(command_id, seq, reply_to):
                    reply_to.tell(Ack(command_id, node, seq))
                    return Behaviors.same()
                case Ping(reply_to):
                    reply_to.tell(node)
                    return Behaviors.same()
            return Behaviors.unhandled()

        return Behaviors.event_sourced(
            entity_id=entity_id,
            journal=journal,
            initial_state=(0, 0),
            on_event=apply,
            on_command=on_command,
            snapshot_policy=SnapshotEvery(n_events=5),
        )

    return factory


async def drive(system: Any, accounts: Any, entities: int, stop: asyncio.Event) -> None:
    """Deposit into every account until ``stop``; print each command's outcome."""
    commands = itertools.count(1)

    async def one_account(entity_id: str) -> None:
        while not stop.is_set():
            command = next(commands)
            try:
                ack: Ack = await system.ask(
                    accounts,
                    lambda r, c=command: ShardEnvelope(entity_id, Deposit(c, 1, r)),
                    timeout=1.0,
                )
            except TimeoutError:
                print(f"LOST {entity_id} {command}", flush=True)
                continue
            assert ack.command == command
            print(f"ACK {entity_id} {command} {ack.node} {ack.sequence_nr}", flush=True)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one_account(f"acct-{i}") for i in range(entities)))


async def read_stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(args: argparse.Namespace) -> None:
    seeds = tuple((HOST, int(port)) for port in args.seeds.split(","))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin = await read_stdin()
    go = asyncio.Event()

    async def commands() -> None:
        while line := await stdin.readline():
            match line.strip():
                case b"go":
                    go.set()
                case b"stop":
                    break
        stop.set()  # stdin closed (the test is gone) or "stop"

    listener = asyncio.create_task(commands())
    try:
        async with SAJournal(args.url) as journal:
            system = ClusteredActorSystem(
                name="bank", host=HOST, port=args.port, node_id=args.node_id, seed_nodes=seeds
            )
            async with system:
                # every node sees every member before spawning: no split shard allocation
                state = await system.wait_for(len(seeds), timeout=30)
                sharded = Behaviors.sharded(
                    account_factory(args.node_id, journal),
                    num_shards=30,
                    replication=ReplicationConfig(replicas=len(seeds) - 1),
                )
                # the leader spawns first: a coordinator that a follower's message creates
                # on the leader before its own spawn ignores ReplicationConfig (casty 0.21),
                # so a dead node's shards are dropped, not moved to a replica, and may then
                # be allocated to the dead node again once gossip revives it
                leads = state.leader == system.self_node
                if leads:
                    accounts = system.spawn(sharded, "accounts")
                await system.barrier("accounts-coordinator", len(seeds), timeout=30)
                if not leads:
                    accounts = system.spawn(sharded, "accounts")
                # a first request through this node's proxy reaches the leader after this
                # node's region registration: once answered, shards can be placed here
                await system.ask(
                    accounts, lambda r: ShardEnvelope(f"ping-{args.node_id}", Ping(r)), timeout=10
                )
                print("READY", flush=True)
                if args.client:
                    started = asyncio.create_task(go.wait())
                    stopped = asyncio.create_task(stop.wait())
                    await asyncio.wait([started, stopped], return_when=asyncio.FIRST_COMPLETED)
                    started.cancel()
                    stopped.cancel()
                    if not stop.is_set():
                        await drive(system, accounts, args.entities, stop)
                await stop.wait()
        print("DONE", flush=True)
    finally:
        listener.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one casty-sa cluster node")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seeds", required=True, help="comma-separated ports on 127.0.0.1")
    parser.add_argument("--url", required=True, help="journal database URL")
    parser.add_argument("--client", action="store_true", help="drive deposits after 'go'")
    parser.add_argument("--entities", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CASTY_NODE_LOG", "WARNING"), stream=sys.stderr)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
