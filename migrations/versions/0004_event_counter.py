"""Create casty_sa_event_counter: the positions MySQL/MariaDB writers take in turn.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

One row (id 1): the highest position handed out. On MySQL/MariaDB every writer
of events takes its positions from it first in its transaction (``UPDATE … SET
position = LAST_INSERT_ID(position + n)``) and holds the row's lock until it
commits, so events commit in position order and a reader never passes one that
commits late (casty_sa.ordering). The row is seeded from the highest position
stored. On PostgreSQL (transaction ids, an identity column) and SQLite (one
writer at a time) it is created empty and never used. A new table: it takes no
lock on the journal's tables; on MySQL a run again after a failure finds the
table (and its row) made.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from casty_sa.models import MYSQL_TABLE
from casty_sa.table_owners import already_there

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

TABLE = "casty_sa_event_counter"


def upgrade() -> None:
    if not already_there(table=TABLE):
        op.create_table(
            TABLE,
            sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
            sa.Column("position", sa.BigInteger(), nullable=False),
            sa.CheckConstraint("id = 1", name=op.f(f"ck_{TABLE}_one_row")),
            sa.PrimaryKeyConstraint("id", name=f"pk_{TABLE}"),
            **MYSQL_TABLE,
        )
    if op.get_context().dialect.name in ("mysql", "mariadb"):
        preparer = op.get_context().dialect.identifier_preparer
        position = preparer.quote("position")
        # rows stored before 0002 have positions below zero: new ones start at 1
        op.execute(
            f"INSERT INTO {_qualified(TABLE)} (id, {position}) SELECT 1, "
            f"GREATEST(COALESCE(MAX({position}), 0), 0) FROM {_qualified('casty_sa_events')} "
            "ON DUPLICATE KEY UPDATE id = id"
        )


def downgrade() -> None:
    op.drop_table(TABLE)


def _qualified(name: str) -> str:
    """``name`` in the migration's schema: raw SQL is not translated by schema_translate_map."""
    schema = op.get_context().version_table_schema
    preparer = op.get_context().dialect.identifier_preparer
    quoted = preparer.quote(name)
    return quoted if schema is None else f"{preparer.quote_schema(schema)}.{quoted}"
