"""Create the journal tables: casty_sa_events and casty_sa_snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Events are keyed by (entity_id, sequence_nr): that primary key is what makes
a second writer of a sequence number fail instead of forking the history.
Snapshots keep one row per entity. Payloads are the serializer's bytes;
timestamps are double precision so casty's ``time.time()`` floats round-trip
exactly. Constraint names follow casty_sa.models.NAMING_CONVENTION.

On MySQL/MariaDB the tables are InnoDB in utf8mb4, the key columns compare byte
for byte (a binary NO PAD collation: "alice", "Alice" and "alice " are three
entities) and payloads are LONGBLOB (BLOB holds 64 KB). MySQL commits each
CREATE TABLE on its own: a run that stopped half-way is finished by running it
again (a table already there is left as it is).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from casty_sa.models import MYSQL_TABLE, ExactString
from casty_sa.table_owners import already_there

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

ENTITY_ID_LENGTH = 512  # casty_sa.models.MAX_ENTITY_ID_LENGTH when this revision was written
PAYLOAD = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def upgrade() -> None:
    if not already_there(table="casty_sa_events"):
        op.create_table(
            "casty_sa_events",
            sa.Column("entity_id", ExactString(ENTITY_ID_LENGTH), nullable=False),
            sa.Column("sequence_nr", sa.BigInteger(), autoincrement=False, nullable=False),
            sa.Column("timestamp", sa.Double(), nullable=False),
            sa.Column("payload", PAYLOAD, nullable=False),
            sa.PrimaryKeyConstraint("entity_id", "sequence_nr", name="pk_casty_sa_events"),
            **MYSQL_TABLE,
        )
    if not already_there(table="casty_sa_snapshots"):
        op.create_table(
            "casty_sa_snapshots",
            sa.Column("entity_id", ExactString(ENTITY_ID_LENGTH), nullable=False),
            sa.Column("sequence_nr", sa.BigInteger(), nullable=False),
            sa.Column("timestamp", sa.Double(), nullable=False),
            sa.Column("payload", PAYLOAD, nullable=False),
            sa.PrimaryKeyConstraint("entity_id", name="pk_casty_sa_snapshots"),
            **MYSQL_TABLE,
        )


def downgrade() -> None:
    op.drop_table("casty_sa_snapshots")
    op.drop_table("casty_sa_events")
