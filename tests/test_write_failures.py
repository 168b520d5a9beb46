"""Which refusals of a write are a sequence conflict: only the events' primary key's.

A violation of the global-order index (it would be a bug of casty-sa's numbering) or of any
other constraint is the database refusing the write: the caller is told so, and that nothing
was stored, never that another writer took its sequence numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import SAJournal
from casty_sa.errors import InvalidEventError, SequenceConflict

from support.dbtools import execute, query

TIMEOUT = 30


async def _collide_next_write(url: URL) -> None:
    """Make the next event written take a place in the global order that is already taken.

    SQLite numbers a write one past the last row in the global order: a row of a later era
    at position 1 makes that 2, which ``("a", 2)`` holds. PostgreSQL takes the transaction id
    and the sequence: a trigger gives entity ``"bad"``'s rows the place of ``("a", 1)``.
    MySQL numbers a write up from the event counter: set back to 0, the next write takes
    position 1, which ``("a", 1)`` holds.
    """
    if url.get_backend_name() == "mysql":
        await execute(url, "UPDATE casty_sa_event_counter SET position = 0")
        return
    if url.get_backend_name() == "sqlite":
        await execute(
            url,
            "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, era,"
            " transaction_id, position) VALUES ('z', 1, 0.0, X'00', 1, 0, 1)",
        )
        return
    await execute(
        url,
        "CREATE FUNCTION collide() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.entity_id = 'bad' THEN SELECT era, transaction_id, position INTO NEW.era,"
        " NEW.transaction_id, NEW.position FROM casty_sa_events"
        " WHERE entity_id = 'a' AND sequence_nr = 1; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER collide BEFORE INSERT ON casty_sa_events FOR EACH ROW "
        "EXECUTE FUNCTION collide()",
    )


@pytest.mark.shared_database
@pytest.mark.parametrize("group_commit", [True, False], ids=["gc", "direct"])
async def test_a_global_order_violation_is_no_sequence_conflict(
    db_url: URL, new_journal: Callable[..., SAJournal], group_commit: bool
) -> None:
    journal = new_journal(group_commit=group_commit)
    async with asyncio.timeout(TIMEOUT):
        await journal.persist("a", [PersistedEvent(1, "a1", 1.0), PersistedEvent(2, "a2", 2.0)])
        await _collide_next_write(db_url)
        entity = "bad" if db_url.get_backend_name() == "postgresql" else "b"
        with pytest.raises(InvalidEventError) as refused:
            await journal.persist(entity, [PersistedEvent(1, "b1", 3.0)])
        assert not isinstance(refused.value, SequenceConflict)
        message = str(refused.value)
        assert "refused the write" in message and "nothing was stored" in message
        assert "ix_casty_sa_events_global_order" in message or "position" in message
        assert await journal.load(entity) == []
        assert await query(
            db_url, f"SELECT count(*) FROM casty_sa_events WHERE entity_id = '{entity}'"
        ) == [(0,)]
        # the primary key's violation still is one (SQLite and MySQL report one violation of
        # a row: with both, the order of their checks would decide; the global order is put
        # right first)
        await execute(db_url, "DELETE FROM casty_sa_events WHERE entity_id = 'z'")
        if db_url.get_backend_name() == "mysql":
            await execute(db_url, "UPDATE casty_sa_event_counter SET position = 2")
        with pytest.raises(SequenceConflict):
            await journal.persist("a", [PersistedEvent(2, "again", 4.0)])


async def _refusing_trigger(url: URL) -> None:
    """An application's trigger that refuses entity ``"boom"``'s events (and no other's)."""
    if url.get_backend_name() == "mysql":
        await execute(
            url,
            "CREATE TRIGGER no_boom BEFORE INSERT ON casty_sa_events FOR EACH ROW "
            "BEGIN IF NEW.entity_id = 'boom' THEN "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'no boom here'; END IF; END",
        )
        return
    await execute(
        url,
        "CREATE FUNCTION no_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.entity_id = 'boom' THEN RAISE EXCEPTION 'no boom here'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER no_boom BEFORE INSERT ON casty_sa_events FOR EACH ROW "
        "EXECUTE FUNCTION no_boom()",
    )


@pytest.mark.only_backends("postgresql", "mysql")
async def test_a_trigger_refusing_one_caller_fails_that_caller_alone(
    db_url: URL, new_journal: Callable[..., SAJournal]
) -> None:
    """A trigger that raises refuses the rows of one caller of a write group: that caller is
    told its write was refused and nothing stored; its neighbours in the group are stored."""
    await _refusing_trigger(db_url)
    journal = new_journal(group_commit=True)
    await journal.start()
    names = [f"ok{n}" for n in range(20)] + ["boom"]
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(
            *(journal.persist(name, [PersistedEvent(1, name, 1.0)]) for name in names),
            return_exceptions=True,
        )
    outcome = dict(zip(names, results, strict=True))
    refused = outcome.pop("boom")
    assert isinstance(refused, InvalidEventError) and not isinstance(refused, SequenceConflict)
    assert "refused the write" in str(refused) and "nothing was stored" in str(refused)
    assert all(result is None for result in outcome.values()), outcome
    rows = await query(db_url, "SELECT entity_id FROM casty_sa_events ORDER BY entity_id")
    assert sorted(entity for (entity,) in rows) == sorted(outcome)
