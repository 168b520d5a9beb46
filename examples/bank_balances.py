"""The bank's accounts, and a balances read model a projection keeps beside them.

The accounts are ``bank_account.py``'s event-sourced actors; a ``Projection``
feeds every account's events into a ``balances`` table (one row per account)
while the accounts take their commands, committing each batch of rows together
with its offset. The program prints the projection's lag while it works, then
the read model next to what the accounts themselves say. Run it twice on the
same database: the accounts recover from the journal, and the projection goes on
from its stored offset, applying each event exactly once::

    python examples/bank_balances.py                      # sqlite:///bank_balances.db here
    python examples/bank_balances.py --url postgresql://user:password@localhost/bank
    python examples/bank_balances.py --url mysql://user:password@localhost/bank  # or mariadb://
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from casty import ActorSystem
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from casty_sa import EventEnvelope, Projection, ProjectionStatus, SAJournal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bank_account import (  # the account lives beside this program
    Account,
    Deposit,
    Deposited,
    GetBalance,
    Withdraw,
    Withdrawn,
    account_behavior,
)

ACCOUNTS = ("alice", "bob", "carol")
#: every account gets these, one after the other; the accounts work at the same time
COMMANDS: Sequence[tuple[type[Deposit] | type[Withdraw], int]] = [
    (Deposit, 100),
    (Withdraw, 30),
    (Deposit, 25),
    (Withdraw, 1_000_000),  # rejected: no event
    (Deposit, 10),
]


# -- the read model: the application's own table -------------------------------------------------


class ReadModel(DeclarativeBase):
    pass


class Balance(ReadModel):
    __tablename__ = "bank_balances"

    account: Mapped[str] = mapped_column(String(100), primary_key=True)
    balance: Mapped[int]
    events: Mapped[int]  # events applied: the account's sequence number once caught up


async def apply(session: AsyncSession, envelope: EventEnvelope) -> None:
    """One account event into the read model; the projection commits it with its offset."""
    row = await session.get(Balance, envelope.entity_id)
    if row is None:
        row = Balance(account=envelope.entity_id, balance=0, events=0)
        session.add(row)
    match envelope.event:
        case Deposited(amount):
            row.balance += amount
        case Withdrawn(amount):
            row.balance -= amount
    row.events += 1


# -- the program ---------------------------------------------------------------------------------


def lag_line(status: ProjectionStatus) -> str:
    return f"projection {status.name!r}: lag {status.lag_events} events, {status.lag_seconds:.2f} s"


async def work(system: Any, journal: SAJournal, name: str) -> Account:
    account = system.spawn(account_behavior(name, journal), name)
    for kind, amount in COMMANDS:
        await system.ask(account, lambda r, k=kind, a=amount: k(a, r), timeout=10.0)
    state: Account = await system.ask(account, GetBalance, timeout=10.0)
    return state


async def caught_up(projection: Projection) -> ProjectionStatus:
    """Wait until the projection has applied everything the journal holds."""
    async with asyncio.timeout(30):
        status = await projection.status()
        while status.lag_events:
            await asyncio.sleep(0.02)
            status = await projection.status()
    return status


async def run(url: str) -> None:
    # migrate=True creates casty-sa's tables on a fresh server database too; in
    # production, run `casty-sa upgrade` instead and leave it off.
    async with SAJournal(url, migrate=True) as journal:
        async with journal.engine.begin() as connection:
            await connection.run_sync(ReadModel.metadata.create_all)
        balances = Projection("bank-balances", journal, apply)
        following = asyncio.create_task(balances.run())
        try:
            async with ActorSystem(name="bank") as system:
                states = await asyncio.gather(*(work(system, journal, n) for n in ACCOUNTS))
                print(f"accounts done; {lag_line(await balances.status())}")
            print(f"caught up;   {lag_line(await caught_up(balances))}")
        finally:
            await balances.stop()
            await following
        async with journal.engine.connect() as connection:
            query = select(Balance.account, Balance.balance, Balance.events)
            rows = (await connection.execute(query.order_by(Balance.account))).all()
    print("read model (bank_balances):")
    for account, balance, events in rows:
        print(f"  {account:<6} balance {balance:>4}  events {events}")
    read = {account: (balance, events) for account, balance, events in rows}
    told = {name: (s.balance, s.version) for name, s in zip(ACCOUNTS, states, strict=True)}
    if read != told:
        sys.exit(f"the read model {read} differs from the accounts' own state {told}")
    print("the read model matches the accounts' own state")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--url",
        default=f"sqlite:///{Path(__file__).resolve().with_name('bank_balances.db')}",
        help="journal database URL (default: sqlite:///bank_balances.db next to this script)",
    )
    args = parser.parse_args(argv)
    asyncio.run(run(args.url))


if __name__ == "__main__":
    main()
