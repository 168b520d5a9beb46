"""Create casty_sa_tombstones: the highest sequence number ever deleted, per entity.

Revision ID: 0005
Revises: 0004
Create Date: 2027-01-11

One row per entity whose oldest events were deleted (``delete_events``, ``casty-sa
prune``): ``sequence_nr`` is the highest one deleted. Every insert of events refuses
a row at or below it, so a deleted sequence number is never used again
(casty_sa.retention). A new table: it takes no lock on the journal's tables and
copies nothing, whatever their size; on MySQL a run again after a failure finds
the table made.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from casty_sa.models import MAX_ENTITY_ID_LENGTH, MYSQL_TABLE, ExactString
from casty_sa.table_owners import already_there

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

TABLE = "casty_sa_tombstones"


def upgrade() -> None:
    if already_there(table=TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("entity_id", ExactString(MAX_ENTITY_ID_LENGTH), nullable=False),
        sa.Column("sequence_nr", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("entity_id", name=f"pk_{TABLE}"),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table(TABLE)
