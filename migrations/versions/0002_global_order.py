"""Give every event a place in one global order, and name its type.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Adds to casty_sa_events (see casty_sa.ordering for what the columns mean):
event_type (the event's class, NULL for the rows stored before), era,
transaction_id and position, and the unique index the read side follows,
(era, transaction_id, position). Rows stored before this revision get
transaction_id 0 and negative positions in primary-key order, so they come
first, each entity's events in sequence order.

On PostgreSQL it runs beside the journal's writers (an older casty-sa's too)
on a table of any size, in three steps, each safe to run again after a crash
(the version table says 0001 until the last one is done):

1. the columns, their defaults and the sequence, in one short transaction that
   waits at most a second for its lock (and tries again a few times): adding a
   column with a constant default only changes the catalog, and from its commit
   on every new row gets its transaction id and position from the defaults;
2. the rows stored before are numbered in batches of 5,000, each committed on
   its own, walking the primary key downwards from where the last batch stopped
   (a run that died half-way finds that place in the numbers it left);
3. the unique index is built CONCURRENTLY, which never blocks a writer.

SQLite (migrated by the journal's first use, one writer at a time) does all of
it in the one transaction the migration runs in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

EVENT_TYPE_LENGTH = 255  # casty_sa.models.EVENT_TYPE_LENGTH when this revision was written
SEQUENCE = "casty_sa_events_position_seq"
INDEX = "ix_casty_sa_events_global_order"
BATCH = 5000
LOCK_TIMEOUT = "1s"  # the longest a writer queues behind this migration's lock request
LOCK_ATTEMPTS = 5
LOCK_PAUSE = 1.0  # seconds between attempts: the long transaction in the way may end

log = logging.getLogger("casty_sa")

# Rows an older casty-sa inserts get (era 0, their transaction id, the sequence's next
# value) from the defaults set in step 1; only the rows stored before that are (0, 0, 0).
_NOT_NUMBERED = "era = 0 AND transaction_id = 0 AND position = 0"


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        _upgrade_in_one_transaction()
        return
    with _one_migrator():
        _with_short_lock(
            "add the columns and the sequence",
            [
                f"CREATE SEQUENCE IF NOT EXISTS {_qualified(SEQUENCE)}",
                # constant defaults: PostgreSQL stores them once, without rewriting the table;
                # then rows written while this runs (by an older casty-sa) get their place too
                f"ALTER TABLE {_events()}"
                f" ADD COLUMN IF NOT EXISTS event_type VARCHAR({EVENT_TYPE_LENGTH}),"
                " ADD COLUMN IF NOT EXISTS era SMALLINT NOT NULL DEFAULT 0,"
                " ADD COLUMN IF NOT EXISTS transaction_id BIGINT NOT NULL DEFAULT 0,"
                " ADD COLUMN IF NOT EXISTS position BIGINT NOT NULL DEFAULT 0,"
                " ALTER COLUMN transaction_id SET DEFAULT (pg_current_xact_id()::text::bigint),"
                f" ALTER COLUMN position SET DEFAULT nextval('{_qualified(SEQUENCE)}'::regclass)",
                f"ALTER SEQUENCE {_qualified(SEQUENCE)} OWNED BY {_events()}.position",
            ],
        )
        with _outside_transactions():
            _number_in_batches()
            _create_index()


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        op.drop_index(INDEX, table_name="casty_sa_events")
        for name in ("position", "transaction_id", "era", "event_type"):
            op.drop_column("casty_sa_events", name)
        return
    with _one_migrator():
        with _outside_transactions():
            op.execute(
                "-- CONCURRENTLY: writers go on while the index is dropped\n"
                f"DROP INDEX CONCURRENTLY IF EXISTS {_qualified(INDEX)}"
            )
        _with_short_lock(
            "drop the columns and the sequence",
            [
                # catalog-only; the sequence goes with the column that owns it
                f"ALTER TABLE {_events()} DROP COLUMN IF EXISTS position,"
                " DROP COLUMN IF EXISTS transaction_id, DROP COLUMN IF EXISTS era,"
                " DROP COLUMN IF EXISTS event_type",
                f"DROP SEQUENCE IF EXISTS {_qualified(SEQUENCE)}",
            ],
        )


# -- SQLite ------------------------------------------------------------------------------------


def _upgrade_in_one_transaction() -> None:
    op.add_column("casty_sa_events", sa.Column("event_type", sa.String(EVENT_TYPE_LENGTH)))
    for name, type_ in (
        ("era", sa.SmallInteger()),
        ("transaction_id", sa.BigInteger()),
        ("position", sa.BigInteger()),
    ):
        op.add_column(
            "casty_sa_events",
            sa.Column(name, type_, nullable=False, server_default=sa.text("0")),
        )
    events = _events()
    # positions -1, -2, … walking the primary key down: ascending in primary-key order
    op.execute(
        f"UPDATE {events} SET position = -numbered.k FROM ("
        "SELECT entity_id AS e, sequence_nr AS s, "
        "row_number() OVER (ORDER BY entity_id DESC, sequence_nr DESC) AS k "
        f"FROM {events} WHERE position = 0) AS numbered "
        f"WHERE {events}.entity_id = numbered.e AND {events}.sequence_nr = numbered.s"
    )
    op.create_index(INDEX, "casty_sa_events", ["era", "transaction_id", "position"], unique=True)


# -- PostgreSQL --------------------------------------------------------------------------------


class _one_migrator:
    """One run of this migration at a time on a schema (a session advisory lock).

    Two journals started with ``migrate=True`` at once would number the same rows;
    the second waits here, then finds every step done. ``--sql`` takes no lock
    (a DBA runs the script once).
    """

    def __enter__(self) -> None:
        self._key = f"casty_sa 0002 {op.get_context().version_table_schema or ''}"
        if not op.get_context().as_sql:
            op.get_bind().execute(
                sa.text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": self._key}
            )

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        if not op.get_context().as_sql:
            if error is not None:
                # the migration fails and its transaction is rolled back anyway; rolled back
                # first, the lock (a session's, not undone by a rollback) can be released
                op.get_bind().rollback()
            op.get_bind().execute(
                sa.text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": self._key}
            )


@contextmanager
def _outside_transactions() -> Iterator[None]:
    """Statements that commit on their own (batches, ``CONCURRENTLY``), after a commit.

    Alembic's ``autocommit_block`` for ``--sql`` (it prints ``COMMIT`` and ``BEGIN``
    around them); online, the migration's connection is usually in a transaction
    casty-sa began (Alembic's block wants its own), so it is done here the same way.
    """
    context = op.get_context()
    if context.as_sql:
        with context.autocommit_block():
            yield
        schema = context.version_table_schema
        if schema is not None:  # env.py's SET LOCAL ended with the transaction it was set in
            op.execute(
                f"SET LOCAL search_path TO {context.dialect.identifier_preparer.quote(schema)}"
            )
        return
    bind = op.get_bind()
    bind.commit()
    level = bind.get_isolation_level()
    bind.execution_options(isolation_level="AUTOCOMMIT")
    try:
        with bind.begin():  # SQLAlchemy's own bookkeeping: the driver commits each statement
            yield
    finally:
        bind.execution_options(isolation_level=level)


def _with_short_lock(what: str, statements: list[str]) -> None:
    """Run ``statements`` in one transaction that never queues long for its locks.

    A DDL statement waiting for ACCESS EXCLUSIVE (behind a long transaction that
    reads the table) makes every writer queue behind it: each attempt waits at
    most ``LOCK_TIMEOUT``, in a savepoint (PL/pgSQL's ``BEGIN … EXCEPTION``),
    and after ``LOCK_ATTEMPTS`` the migration stops with an error saying so.
    The transaction is committed at once, so the lock is held for a moment.
    The same block runs online and in the ``--sql`` script.
    """
    body = "\n".join(f"            {statement};" for statement in statements)
    if not op.get_context().as_sql:
        op.get_bind().commit()  # what came before holds no lock while this one waits
    op.execute(
        f"-- {what}: ACCESS EXCLUSIVE for a moment, waiting at most {LOCK_TIMEOUT} per attempt\n"
        "-- so the journal's writers never queue behind this for longer\n"
        "DO $ddl$\nBEGIN\n"
        f"    FOR attempt IN 1..{LOCK_ATTEMPTS} LOOP\n"
        "        BEGIN\n"
        f"            SET LOCAL lock_timeout = '{LOCK_TIMEOUT}';\n"
        f"{body}\n"
        "            RETURN;\n"
        "        EXCEPTION WHEN lock_not_available THEN\n"
        f"            PERFORM pg_sleep({LOCK_PAUSE});\n"
        "        END;\n"
        "    END LOOP;\n"
        "    RAISE EXCEPTION USING ERRCODE = 'lock_not_available', MESSAGE = "
        f"'casty-sa migration 0002 could not {what}: casty_sa_events stayed locked by "
        f"another transaction through {LOCK_ATTEMPTS} attempts of {LOCK_TIMEOUT}; nothing "
        "of this step was changed',\n"
        "        HINT = 'End the long transaction (see pg_stat_activity) and run the "
        "migration again.';\n"
        "END $ddl$"
    )
    if not op.get_context().as_sql:
        op.get_bind().commit()


def _batch_statement(after: str | None, top: str) -> str:
    """Number the next ``BATCH`` rows stored before 0002, below the key ``after``.

    Walks the primary key downwards (an index scan that stops after ``BATCH`` rows)
    and gives them ``top - 1``, ``top - 2``, …; returns the lowest key it numbered
    with its position, where the next batch starts. ``after`` is the SQL of the
    ``(entity_id, sequence_nr)`` to start below (``None``: from the top), ``top``
    the SQL of the lowest position given so far (0 at first).
    """
    below = "" if after is None else f"(entity_id, sequence_nr) < {after} AND "
    events = _events()
    return (
        "WITH batch AS (\n"
        "    SELECT entity_id, sequence_nr,\n"
        "        row_number() OVER (ORDER BY entity_id DESC, sequence_nr DESC) AS k\n"
        f"    FROM {events} WHERE {below}{_NOT_NUMBERED}\n"
        f"    ORDER BY entity_id DESC, sequence_nr DESC LIMIT {BATCH}\n"
        "), numbered AS (\n"
        f"    UPDATE {events} AS e SET position = {top} - batch.k FROM batch\n"
        "    WHERE e.entity_id = batch.entity_id AND e.sequence_nr = batch.sequence_nr\n"
        "    RETURNING e.entity_id, e.sequence_nr, e.position\n"
        ") SELECT entity_id, sequence_nr, position FROM numbered ORDER BY position LIMIT 1"
    )


def _resume_statement() -> str:
    """Where an earlier run stopped: the lowest key numbered so far (one scan)."""
    return (
        f"SELECT entity_id, sequence_nr, position FROM {_events()}"
        " WHERE era = 0 AND transaction_id = 0 AND position < 0 ORDER BY position LIMIT 1"
    )


def _number_in_batches() -> None:
    """Positions for the rows stored before 0002, in batches committed one by one.

    Online, each batch is a statement of its own (autocommit); ``--sql`` prints the
    same statements in a ``DO`` block that commits after each batch.
    """
    if op.get_context().as_sql:
        op.execute(
            "-- number the rows stored before 0002: batches of "
            f"{BATCH:,} rows, each committed on its own\n"
            "-- (row locks on that batch only); run again, it goes on where it stopped.\n"
            "-- COMMIT in DO needs PostgreSQL 11 and no enclosing transaction block\n"
            "DO $numbering$\nDECLARE\n"
            f"    after_entity VARCHAR; after_nr BIGINT; top BIGINT;\nBEGIN\n"
            f"    {_resume_statement()} INTO after_entity, after_nr, top;\n"
            "    IF NOT FOUND THEN\n"
            f"        {_batch_statement(None, '0')} INTO after_entity, after_nr, top;\n"
            "        IF NOT FOUND THEN RETURN; END IF;\n"
            "        COMMIT;\n"
            "    END IF;\n"
            "    LOOP\n"
            f"        {_batch_statement('(after_entity, after_nr)', 'top')}"
            " INTO after_entity, after_nr, top;\n"
            "        EXIT WHEN NOT FOUND;\n"
            "        COMMIT;\n"
            "    END LOOP;\n"
            "END $numbering$"
        )
        return
    bind = op.get_bind()
    found = bind.execute(sa.text(_resume_statement())).first()
    first = sa.text(_batch_statement(None, "0"))
    next_ = sa.text(_batch_statement("(:entity, :nr)", ":top"))
    batches = 0
    while True:
        if found is None:
            found = bind.execute(first).first()
        else:
            entity, nr, top = found
            found = bind.execute(next_, {"entity": entity, "nr": nr, "top": top}).first()
        if found is None:
            break
        batches += 1
        if batches % 20 == 0:
            log.info("casty_sa: 0002 numbered %d rows stored before it", -found[2])
    if batches:
        log.info("casty_sa: 0002 numbered the rows stored before it in %d batches", batches)


def _create_index() -> None:
    """The unique global-order index, built without blocking writers."""
    create = (
        f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {_quoted(INDEX)}"
        f" ON {_events()} (era, transaction_id, position)"
    )
    if op.get_context().as_sql:
        # an earlier run that failed half-way leaves an INVALID index of that name behind
        op.execute(
            "-- CONCURRENTLY: writers go on while it is built; a build that failed leaves\n"
            "-- an INVALID index behind, dropped first (outside any transaction, both)\n"
            f"DROP INDEX CONCURRENTLY IF EXISTS {_qualified(INDEX)}"
        )
        op.execute(create)
        return
    bind = op.get_bind()
    valid = bind.execute(
        sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:index)"),
        {"index": _qualified(INDEX)},
    ).scalar()
    if valid is False:
        bind.execute(sa.text(f"DROP INDEX CONCURRENTLY {_qualified(INDEX)}"))
    bind.execute(sa.text(create))


def _events() -> str:
    return _qualified("casty_sa_events")


def _quoted(name: str) -> str:
    return op.get_context().dialect.identifier_preparer.quote(name)


def _qualified(name: str) -> str:
    """``name`` in the migration's schema: raw SQL is not translated by schema_translate_map."""
    schema = op.get_context().version_table_schema
    preparer = op.get_context().dialect.identifier_preparer
    quoted = preparer.quote(name)
    return quoted if schema is None else f"{preparer.quote_schema(schema)}.{quoted}"
