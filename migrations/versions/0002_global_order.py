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
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import CreateSequence, DropSequence

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

EVENT_TYPE_LENGTH = 255  # casty_sa.models.EVENT_TYPE_LENGTH when this revision was written
SEQUENCE = "casty_sa_events_position_seq"
INDEX = "ix_casty_sa_events_global_order"
BATCH = 5000


def upgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    if postgresql:
        op.execute(CreateSequence(sa.Sequence(SEQUENCE)))
    # constant defaults: PostgreSQL stores them once, without rewriting the table
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
    if postgresql:
        # rows an older casty-sa writes while this runs get their place too
        op.alter_column(
            "casty_sa_events",
            "transaction_id",
            server_default=sa.text("(pg_current_xact_id()::text::bigint)"),
        )
        op.alter_column(
            "casty_sa_events",
            "position",
            server_default=sa.text(f"nextval('{_qualified(SEQUENCE)}'::regclass)"),
        )
        op.execute(
            f"ALTER SEQUENCE {_qualified(SEQUENCE)} OWNED BY "
            f"{_qualified('casty_sa_events')}.position"
        )
    _number_stored_rows()
    op.create_index(INDEX, "casty_sa_events", ["era", "transaction_id", "position"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="casty_sa_events")
    for name in ("position", "transaction_id", "era", "event_type"):
        op.drop_column("casty_sa_events", name)
    if op.get_context().dialect.name == "postgresql":
        op.execute(DropSequence(sa.Sequence(SEQUENCE), if_exists=True))


def _number_stored_rows() -> None:
    """Positions -1, -2, … for the rows stored before, walking the primary key down."""
    events = _qualified("casty_sa_events")
    op.execute(
        f"UPDATE {events} SET position = -numbered.k FROM ("
        "SELECT entity_id AS e, sequence_nr AS s, "
        "row_number() OVER (ORDER BY entity_id DESC, sequence_nr DESC) AS k "
        f"FROM {events} WHERE position = 0) AS numbered "
        f"WHERE {events}.entity_id = numbered.e AND {events}.sequence_nr = numbered.s"
    )


def _qualified(name: str) -> str:
    schema = op.get_context().version_table_schema
    preparer = op.get_context().dialect.identifier_preparer
    quoted = preparer.quote(name)
    return quoted if schema is None else f"{preparer.quote_schema(schema)}.{quoted}"
