"""Create casty_sa_projection_offsets: where each projection stands, and who may move it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

One row per slice of a projection (casty_sa.projections): the offset of the
last event it handled, updated in the same transaction as the read model's
writes, and the lease (owner, expiry on the database's clock, fence) that lets
exactly one worker apply events to a slice. A new, empty table: creating it
takes no lock on the journal's tables, on any database. Constraint names follow
casty_sa.models.NAMING_CONVENTION. On MySQL/MariaDB projection names compare
byte for byte (see 0001), and a run again after a failure finds the table made.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from casty_sa.models import MYSQL_TABLE, ExactString
from casty_sa.table_owners import already_there

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

NAME_LENGTH = 255  # casty_sa.models.PROJECTION_NAME_LENGTH when this revision was written
OWNER_LENGTH = 255  # casty_sa.models.OWNER_LENGTH
TABLE = "casty_sa_projection_offsets"


def upgrade() -> None:
    if already_there(table=TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("projection", ExactString(NAME_LENGTH), nullable=False),
        sa.Column("slice", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("slice_count", sa.SmallInteger(), nullable=False),
        sa.Column("last_offset", sa.String(36), nullable=True),
        sa.Column("handled", sa.BigInteger(), nullable=False),
        sa.Column("fence", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.String(OWNER_LENGTH), nullable=True),
        sa.Column("lease_expires_ms", sa.BigInteger(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_ms", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("slice_count >= 1", name=op.f(f"ck_{TABLE}_slice_count")),
        sa.CheckConstraint("slice >= 0 AND slice < slice_count", name=op.f(f"ck_{TABLE}_slice")),
        sa.PrimaryKeyConstraint("projection", "slice", name=f"pk_{TABLE}"),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table(TABLE)
