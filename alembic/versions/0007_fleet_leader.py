"""The fleet_leader row: which gateway replica leads the fleet, its URL and fencing term.

Replicas (a Ray cluster and PostgreSQL) take the lead with a session-level advisory lock; the
replica that takes it increments `term` and writes its URL here. Downgrading drops the table
(the next leader writes term 1 again).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 18:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'fleet_leader',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('term', sa.BigInteger(), nullable=False),
        sa.Column('holder', sa.String(length=128), nullable=False),
        sa.Column('url', sa.String(length=512), nullable=False),
        sa.Column('since', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('fleet_leader')
