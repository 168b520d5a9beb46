"""Replicas for clusters whose nodes each keep their own journal file.

casty 0.21 can replicate event-sourced entities: a primary sends every
persisted batch to ``replica_refs``, and a ``replica_region_actor`` on each
replica node stores what it receives when its journal is
``JournalKind.local``. But ``Behaviors.sharded(..., replication=...)`` only
chooses replica *nodes*; it never starts the replica regions nor hands
``replica_refs`` to the entities. Without them, the file of the node that takes
over a shard after a failure is empty for that shard's entities.

:class:`LocalReplication` does that wiring for one journal on one node: it
starts a replica region there, follows cluster membership, and gives entities
the refs of the replica regions on every other node that is up. Start it on
every node, after ``wait_for(n)`` and before spawning the sharded behaviour.
Unlike casty's bare replica region, which stops for good on its first failed
write, this one logs a batch it cannot store (a sequence number the node's
file already holds, an unavailable disk) and goes on with the next.

What this gives and what it cannot (see the README's cluster section): every
node's file receives, in order, each batch a primary persisted while that node
was up and reachable. Replication is fire-and-forget (casty's ``min_acks`` is
unusable in 0.21), so the batches in flight when a primary dies, and
everything written while a node was down, are missing from that node's file
and are never back-filled. A node whose file missed events recovers stale
state when it later owns the entity. Use a centralized database (PostgreSQL)
when that is not acceptable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from casty import (
    Behaviors,
    JournalKind,
    MemberStatus,
    NodeAddress,
    OneForOneStrategy,
    PersistedEvent,
    Snapshot,
    SubscribeTopology,
    TopologySnapshot,
)
from casty.cluster.replica import replica_region_actor

from casty_sa.errors import JournalError, SequenceConflict

__all__ = ["DEFAULT_REGION_NAME", "LocalReplication"]

log = logging.getLogger("casty_sa.replication")

#: Actor name of the replica region on each node (the same on every node).
DEFAULT_REGION_NAME = "casty-sa-replicas"


class _ReplicaJournal:
    """The node's journal as seen by its replica region: errors are logged, not raised.

    casty's replica region stops for good on the first exception from
    ``persist``, after which every later batch sent to this node is dropped
    without a word. Here a failed batch is logged and skipped instead, so one
    bad batch costs that batch, not the node's whole replication.
    """

    def __init__(self, journal: Any, node: str) -> None:
        self._journal = journal
        self._node = node

    @property
    def kind(self) -> Any:
        return self._journal.kind

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        try:
            await self._journal.persist(entity_id, events)
        except SequenceConflict as exc:
            log.warning(
                "casty_sa: replica on %s skipped %d event(s) of %r: sequence number %d is "
                "already in this node's journal (its history may differ from the primary's)",
                self._node,
                len(events),
                entity_id,
                exc.sequence_nr,
            )
        except JournalError as exc:
            log.error(
                "casty_sa: replica on %s could not store %d event(s) of %r; this node's "
                "journal now misses them: %s",
                self._node,
                len(events),
                entity_id,
                exc,
            )

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        result: list[PersistedEvent[Any]] = await self._journal.load(entity_id, from_sequence_nr)
        return result

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        await self._journal.save_snapshot(entity_id, snapshot)

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        result: Snapshot[Any] | None = await self._journal.load_snapshot(entity_id)
        return result


def _keep(state: object, event: object) -> object:
    """The replica region's fold: its in-memory states are never read, so keep none."""
    return state


class LocalReplication:
    """Replica wiring of one node-local journal in a ``ClusteredActorSystem``.

    Create it with :meth:`start` on every node, then pass :meth:`refs` as
    ``replica_refs`` to ``Behaviors.event_sourced`` in the entity factory. The
    refs are taken when the entity activates, so an entity replicates to the
    nodes that were up at that moment.

    Parameters
    ----------
    system : ClusteredActorSystem
        This node's system, already started.
    journal : EventJournal
        This node's journal (the same instance its entities use). Meant for
        ``JournalKind.local`` journals; with a centralized one casty's replicas
        store nothing, so the wiring only costs messages.
    name : str
        Actor name of the replica region; the same on every node.

    Examples
    --------
    One node alone has no peers to replicate to:

    >>> import asyncio
    >>> from casty import ClusteredActorSystem
    >>> from casty_sa import SAJournal
    >>> async def main() -> tuple[object, ...]:
    ...     async with (
    ...         SAJournal("sqlite://") as journal,
    ...         ClusteredActorSystem(
    ...             name="bank", host="127.0.0.1", port=0, node_id="n1"
    ...         ) as system,
    ...     ):
    ...         replication = await LocalReplication.start(system, journal)
    ...         return replication.refs()
    >>> asyncio.run(main())
    ()

    In an entity factory of a three-node cluster (``account_behavior`` being
    the application's function around ``Behaviors.event_sourced``)::

        await system.wait_for(3)
        replication = await LocalReplication.start(system, journal)

        def account(entity_id: str) -> Behavior[AccountMsg]:
            return account_behavior(entity_id, journal, replica_refs=replication.refs())

        accounts = system.spawn(
            Behaviors.sharded(account, num_shards=64, replication=ReplicationConfig(replicas=2)),
            "accounts",
        )
    """

    def __init__(self, system: Any, journal: Any, *, name: str = DEFAULT_REGION_NAME) -> None:
        self._system = system
        self._journal = journal
        self._name = name
        self._self_node: NodeAddress = system.self_node
        self._peers: frozenset[NodeAddress] = frozenset()

    @classmethod
    async def start(
        cls,
        system: Any,
        journal: Any,
        *,
        name: str = DEFAULT_REGION_NAME,
        membership_timeout: float = 5.0,
    ) -> LocalReplication:
        """Start this node's replica region and begin following membership.

        Parameters
        ----------
        system : ClusteredActorSystem
            This node's started system.
        journal : EventJournal
            This node's journal.
        name : str
            Actor name of the replica region, the same on every node.
        membership_timeout : float
            Seconds to wait for the current cluster membership.

        Returns
        -------
        LocalReplication
            Whose :meth:`refs` already lists the peers that are up.
        """
        replication = cls(system, journal, name=name)
        node = f"{replication._self_node.host}:{replication._self_node.port}"
        if journal.kind is not JournalKind.local:
            log.info(
                "casty_sa: %r is %s; replicas will not store events (the database is shared)",
                journal,
                journal.kind.value,
            )
        system.spawn(
            Behaviors.supervise(
                replica_region_actor(
                    journal=_ReplicaJournal(journal, node),
                    on_event=_keep,
                    initial_state=None,
                    logger=logging.getLogger(f"casty_sa.replication.{name}"),
                ),
                OneForOneStrategy(max_restarts=100, within=60.0),
            ),
            name,
        )
        state = await system.get_cluster_state(timeout=membership_timeout)
        replication._observe(state.members, frozenset(state.unreachable))
        topology = system.lookup("/_cluster/_topology")
        if topology is not None:
            system.spawn(replication._membership_follower(topology), f"{name}-membership")
        return replication

    @property
    def peers(self) -> frozenset[NodeAddress]:
        """Other nodes currently up and reachable: where entities replicate to."""
        return self._peers

    def refs(self) -> tuple[Any, ...]:
        """Refs of the replica regions on :attr:`peers`, for ``replica_refs=``.

        Returns
        -------
        tuple[ActorRef, ...]
            Empty when no other node is up: entities activated then replicate
            nowhere, even after other nodes join.
        """
        return tuple(
            self._system.lookup(f"/{self._name}", node=peer) for peer in sorted(self._peers)
        )

    def _observe(self, members: Any, unreachable: frozenset[NodeAddress]) -> None:
        self._peers = frozenset(
            member.address
            for member in members
            if member.status == MemberStatus.up
            and member.address != self._self_node
            and member.address not in unreachable
        )

    def _membership_follower(self, topology: Any) -> Any:
        async def setup(ctx: Any) -> Any:
            topology.tell(SubscribeTopology(reply_to=ctx.self))

            async def receive(ctx: Any, msg: Any) -> Any:
                if isinstance(msg, TopologySnapshot):
                    self._observe(msg.members, frozenset(msg.unreachable))
                return Behaviors.same()

            return Behaviors.receive(receive)

        return Behaviors.setup(setup)
