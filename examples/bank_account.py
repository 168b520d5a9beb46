"""An event-sourced bank account on casty, stored by casty-sa's ``SAJournal``.

Every run recovers the account from the journal (the latest snapshot plus
the events after it), makes a few deposits and withdrawals, and prints what it
recovered and where it ended. Run it twice on the same database to watch
recovery::

    python examples/bank_account.py                      # sqlite:///bank.db next to this file
    python examples/bank_account.py --url sqlite:///examples/bank.db
    python examples/bank_account.py --url postgresql://user:password@localhost/bank
    python examples/bank_account.py --url mysql://user:password@localhost/bank  # or mariadb://

The account replies to a command only once its events are stored: the
command handler tells the account itself to confirm, and casty handles that
message after the ``persist`` call of the command has returned (casty's own
replies, sent from ``on_command``, leave before anything is stored).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casty import ActorSystem, Behaviors, PersistedEvent, Snapshot, SnapshotEvery

from casty_sa import SAJournal

ACCOUNT_ID = "alice"
SNAPSHOT_EVERY = 3

# The tests run this account on casty too (tests/test_casty_*.py import the events, the state,
# apply and the commands below), so the example and the tests cannot drift apart.

# -- events: what is stored ----------------------------------------------------------------------


@dataclass(frozen=True)
class Deposited:
    amount: int


@dataclass(frozen=True)
class Withdrawn:
    amount: int


type Event = Deposited | Withdrawn


# -- state: folded from the events ---------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    balance: int = 0
    version: int = 0  # events applied so far: the sequence number of the last one


def apply(account: Account, event: Event) -> Account:
    match event:
        case Deposited(amount):
            return Account(account.balance + amount, account.version + 1)
        case Withdrawn(amount):
            return Account(account.balance - amount, account.version + 1)


# -- commands: what the account is asked ---------------------------------------------------------


@dataclass(frozen=True)
class Deposit:
    amount: int
    reply_to: Any


@dataclass(frozen=True)
class Withdraw:
    amount: int
    reply_to: Any


@dataclass(frozen=True)
class GetBalance:
    reply_to: Any


@dataclass(frozen=True)
class Accepted:
    balance: int


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class _Confirm:
    """Handled after the command's events are stored; carries the reply."""

    reply_to: Any
    reply: Accepted


type Command = Deposit | Withdraw | GetBalance | _Confirm


def account_behavior(entity_id: str, journal: SAJournal) -> Any:
    async def on_command(ctx: Any, account: Account, command: Command) -> Any:
        match command:
            case Deposit(amount, reply_to) if amount > 0:
                ctx.self.tell(_Confirm(reply_to, Accepted(account.balance + amount)))
                return Behaviors.persisted([Deposited(amount)])
            case Withdraw(amount, reply_to) if 0 < amount <= account.balance:
                ctx.self.tell(_Confirm(reply_to, Accepted(account.balance - amount)))
                return Behaviors.persisted([Withdrawn(amount)])
            case Deposit(amount, reply_to) | Withdraw(amount, reply_to):
                reply_to.tell(Rejected(f"cannot move {amount} with a balance of {account.balance}"))
                return Behaviors.same()
            case GetBalance(reply_to):
                reply_to.tell(account)
                return Behaviors.same()
            case _Confirm(reply_to, reply):
                reply_to.tell(reply)
                return Behaviors.same()

    return Behaviors.event_sourced(
        entity_id=entity_id,
        journal=journal,
        initial_state=Account(),
        on_event=apply,
        on_command=on_command,
        snapshot_policy=SnapshotEvery(n_events=SNAPSHOT_EVERY),
    )


# -- the journal, telling what casty read from it at recovery -----------------------------------


class ReportingJournal(SAJournal):
    """``SAJournal`` that remembers what the account's recovery read."""

    snapshot_read: Snapshot[Any] | None = None
    events_replayed: int = 0

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        self.snapshot_read = await super().load_snapshot(entity_id)
        return self.snapshot_read

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        events = await super().load(entity_id, from_sequence_nr)
        self.events_replayed = len(events)
        return events


def recovery_line(journal: ReportingJournal, account: Account) -> str:
    if journal.snapshot_read is None and journal.events_replayed == 0:
        return "recovered: nothing stored yet, new account (balance 0)"
    source = (
        f"snapshot at seq {journal.snapshot_read.sequence_nr}"
        if journal.snapshot_read is not None
        else "no snapshot"
    )
    return (
        f"recovered: balance {account.balance} at seq {account.version} "
        f"({source}, {journal.events_replayed} events replayed)"
    )


async def run(url: str) -> None:
    # migrate=True creates the tables on a fresh server database too; in
    # production, run `casty-sa upgrade` instead and leave it off.
    async with (
        ReportingJournal(url, migrate=True) as journal,
        ActorSystem(name="bank") as system,
    ):
        account = system.spawn(account_behavior(ACCOUNT_ID, journal), ACCOUNT_ID)
        state: Account = await system.ask(account, GetBalance, timeout=10.0)
        print(recovery_line(journal, state))

        commands: Sequence[tuple[type[Deposit] | type[Withdraw], int]] = [
            (Deposit, 100),
            (Withdraw, 30),
            (Deposit, 25),
            (Withdraw, 1_000_000),
            (Deposit, 10),
            (Withdraw, 5),
        ]
        for kind, amount in commands:
            reply = await system.ask(account, lambda r, k=kind, a=amount: k(a, r), timeout=10.0)
            print(f"  {kind.__name__.lower()} {amount}: {reply}")

        state = await system.ask(account, GetBalance, timeout=10.0)
        print(f"final: balance {state.balance} at seq {state.version}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--url",
        default=f"sqlite:///{Path(__file__).resolve().with_name('bank.db')}",
        help="journal database URL (default: sqlite:///bank.db next to this script)",
    )
    args = parser.parse_args(argv)
    asyncio.run(run(args.url))


if __name__ == "__main__":
    main()
