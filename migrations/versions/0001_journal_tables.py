"""Create the journal tables: casty_sa_events and casty_sa_snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Events are keyed by (entity_id, sequence_nr): that primary key is what makes
a second writer of a sequence number fail instead of forking the history.
Snapshots keep one row per entity. Payloads are the serializer's bytes;
timestamps are double precision so casty's ``time.time()`` floats round-trip
exactly. Constraint names follow casty_sa.models.NAMING_CONVENTION.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

ENTITY_ID_LENGTH = 512  # casty_sa.models.MAX_ENTITY_ID_LENGTH when this revision was written


def upgrade() -> None:
    op.create_table(
        "casty_sa_events",
        sa.Column("entity_id", sa.String(ENTITY_ID_LENGTH), nullable=False),
        sa.Column("sequence_nr", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("entity_id", "sequence_nr", name="pk_casty_sa_events"),
    )
    op.create_table(
        "casty_sa_snapshots",
        sa.Column("entity_id", sa.String(ENTITY_ID_LENGTH), nullable=False),
        sa.Column("sequence_nr", sa.BigInteger(), nullable=False),
        sa.Column("timestamp", sa.Double(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("entity_id", name="pk_casty_sa_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("casty_sa_snapshots")
    op.drop_table("casty_sa_events")
