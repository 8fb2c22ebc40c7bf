"""Conversations of OpenAI's Conversations API (POST /v1/conversations), used by the Responses API.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_conversations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_conversations"),
    )
    op.create_index("ix_api_conversations_created_at", "api_conversations", ["created_at"])


def downgrade() -> None:
    op.drop_table("api_conversations")
