"""each campaign's breakdown by reply class and domain, as last computed

Counting a big campaign by recipient domain takes most of a second; the dashboard keeps the
result with the state counts it was computed at (mailer/breakdowns.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    json = sa.JSON().with_variant(JSONB(), "postgresql")
    op.create_table(
        "campaign_breakdowns",
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("counts", json, nullable=False),
        sa.Column("by_class", json, nullable=False),
        sa.Column("by_domain", json, nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name="fk_campaign_breakdowns_campaign_id_campaigns",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("campaign_id", name="pk_campaign_breakdowns"),
    )


def downgrade() -> None:
    op.drop_table("campaign_breakdowns")
