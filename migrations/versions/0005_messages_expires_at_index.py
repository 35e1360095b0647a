"""an index on messages.expires_at for the dispatcher's expiry pass

The pass closes the queued and deferred deliveries of messages that expired lately: it starts
from those messages (this partial index holds only messages with an expiry), not from every
delivery that is waiting.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_messages_expires_at",
        "messages",
        ["expires_at"],
        postgresql_where=sa.text("expires_at IS NOT NULL"),
        sqlite_where=sa.text("expires_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_expires_at", table_name="messages")
