"""Chat idempotency keys keep what a replay sends again (the first response's body, or a
stream's id, created, model and finish_reason), so that a retry gets the same response.

A nullable text column: keys saved before it replay a response rebuilt from the stored
message, as they did. Downgrading drops the column (replays are rebuilt again).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('chat_idempotency', schema=None) as batch_op:
        batch_op.add_column(sa.Column('response', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('chat_idempotency', schema=None) as batch_op:
        batch_op.drop_column('response')
