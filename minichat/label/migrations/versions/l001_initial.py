"""Labeling app: users, sessions, projects, prompts, tasks, answers, assignments, records.

Revision ID: l001
Revises:
Create Date: 2025-01-02
"""
import sqlalchemy as sa
from alembic import op

revision = "l001"
down_revision = None
branch_labels = ("label",)
depends_on = None


def _fk(table, col, ref):
    return sa.ForeignKeyConstraint([col], [f"{ref}.id"], ondelete="CASCADE", name=f"fk_{table}_{col}_{ref}")


def upgrade() -> None:
    op.create_table(
        "label_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("secret_hash", sa.String(200), nullable=False),
        sa.Column("held_out", sa.Boolean(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_label_users"),
        sa.UniqueConstraint("name", name="uq_label_users_name"),
    )
    op.create_table(
        "label_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("label_sessions", "user_id", "label_users"),
        sa.PrimaryKeyConstraint("token_hash", name="pk_label_sessions"),
    )
    op.create_index("ix_label_sessions_user_id", "label_sessions", ["user_id"])
    op.create_table(
        "label_projects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("guidelines", sa.Text(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_label_projects"),
        sa.UniqueConstraint("name", name="uq_label_projects_name"),
    )
    op.create_table(
        "label_prompts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("category", sa.String(40), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(300), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("label_prompts", "project_id", "label_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_label_prompts"),
    )
    op.create_index("ix_label_prompts_project_id", "label_prompts", ["project_id"])
    op.create_table(
        "label_tasks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("label_tasks", "project_id", "label_projects"),
        _fk("label_tasks", "prompt_id", "label_prompts"),
        sa.PrimaryKeyConstraint("id", name="pk_label_tasks"),
        sa.UniqueConstraint("prompt_id", "kind", name="uq_label_tasks_prompt_kind"),
    )
    op.create_index("ix_label_tasks_project_id", "label_tasks", ["project_id"])
    op.create_table(
        "label_answers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("label_answers", "task_id", "label_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_label_answers"),
        sa.UniqueConstraint("task_id", "position", name="uq_label_answers_task_position"),
    )
    op.create_index("ix_label_answers_task_id", "label_answers", ["task_id"])
    op.create_table(
        "label_assignments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("order", sa.JSON(), nullable=False),
        sa.Column("draft", sa.JSON(), nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        _fk("label_assignments", "task_id", "label_tasks"),
        _fk("label_assignments", "user_id", "label_users"),
        sa.PrimaryKeyConstraint("id", name="pk_label_assignments"),
        sa.UniqueConstraint("task_id", "user_id", name="uq_label_assignments_task_user"),
        sa.UniqueConstraint("task_id", "slot", name="uq_label_assignments_task_slot"),
    )
    op.create_index("ix_label_assignments_task_id", "label_assignments", ["task_id"])
    op.create_index("ix_label_assignments_user_id", "label_assignments", ["user_id"])
    op.create_table(
        "label_demonstrations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        _fk("label_demonstrations", "assignment_id", "label_assignments"),
        sa.PrimaryKeyConstraint("id", name="pk_label_demonstrations"),
        sa.UniqueConstraint("assignment_id", name="uq_label_demonstrations_assignment_id"),
    )
    op.create_index("ix_label_demonstrations_updated_at", "label_demonstrations", ["updated_at"])
    op.create_table(
        "label_rankings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("answer_ids", sa.JSON(), nullable=False),
        sa.Column("ranks", sa.JSON(), nullable=False),
        sa.Column("none_acceptable", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        _fk("label_rankings", "assignment_id", "label_assignments"),
        sa.PrimaryKeyConstraint("id", name="pk_label_rankings"),
        sa.UniqueConstraint("assignment_id", name="uq_label_rankings_assignment_id"),
    )
    op.create_index("ix_label_rankings_updated_at", "label_rankings", ["updated_at"])
    op.create_table(
        "label_ratings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("answer_id", sa.Integer(), nullable=False),
        sa.Column("likert", sa.Integer(), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        _fk("label_ratings", "assignment_id", "label_assignments"),
        _fk("label_ratings", "answer_id", "label_answers"),
        sa.PrimaryKeyConstraint("id", name="pk_label_ratings"),
        sa.UniqueConstraint("assignment_id", "answer_id", name="uq_label_ratings_assignment_answer"),
    )
    op.create_index("ix_label_ratings_assignment_id", "label_ratings", ["assignment_id"])
    op.create_index("ix_label_ratings_updated_at", "label_ratings", ["updated_at"])


def downgrade() -> None:
    for name in ("label_ratings", "label_rankings", "label_demonstrations", "label_assignments", "label_answers",
                 "label_tasks", "label_prompts", "label_projects", "label_sessions", "label_users"):
        op.drop_table(name)
