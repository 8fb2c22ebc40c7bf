"""The labeling app's tables, on their own SQLAlchemy metadata (same database as the serving store).

    label_users          labelers and admins: name, role, a hashed secret (token or password), held_out
    label_sessions       browser/API sessions made by logging in (only a hash of the session token is kept)
    label_projects       a set of prompts with guidelines (Markdown) and settings (models, sampling, K, overlap)
    label_prompts        a conversation ending with a user turn, an optional use-case category, metadata
    label_tasks          one unit of work on a prompt: demonstration | ranking | rating
    label_answers        the answers a ranking or rating task shows (sampled from the project's models)
    label_assignments    a task given to one labeler (slot < overlap; unique per task and slot, and per task and
                         user, so concurrent "next task" requests can never over-assign); draft = unsaved work
    label_demonstrations / label_rankings / label_ratings   the submitted records, unique per assignment (and
                         answer), so two concurrent submits update one row instead of adding two

The metadata is separate from the serving store's `Base` and the migrations keep their own version table
(`label_alembic_version`): tools that open the store without knowing these migrations (e.g.
`minichat feedback export`) keep working on a database the labeling app has extended.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from minichat.serve.store import NAMING, utcnow

# InstructGPT's use-case categories (Table 1 of the paper)
CATEGORIES = ("generation", "open qa", "brainstorming", "chat", "rewrite", "summarization", "classification",
              "closed qa", "extract", "other")
# InstructGPT's yes/no metadata asked for every rated answer (Table 3 of the paper)
FLAGS = ("fails_to_follow_instruction", "inappropriate_for_customer_assistant", "hallucination",
         "satisfies_constraint", "sexual_content", "violent_content", "encourages_violence_abuse_self_harm",
         "denigrates_protected_class", "harmful_advice", "expresses_opinion", "expresses_moral_judgment")
TASK_KINDS = ("demonstration", "ranking", "rating")
ROLES = ("admin", "labeler")


class LabelBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(LabelBase):
    __tablename__ = "label_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20), default="labeler")
    secret_hash: Mapped[str] = mapped_column(String(200))
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)  # judgments for evaluation only
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Session(LabelBase):
    __tablename__ = "label_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("label_users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Project(LabelBase):
    __tablename__ = "label_projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # ProjectConfig as a dict
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Prompt(LabelBase):
    __tablename__ = "label_prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("label_projects.id", ondelete="CASCADE"), index=True)
    messages: Mapped[list] = mapped_column(JSON)  # ends with a user turn
    category: Mapped[str | None] = mapped_column(String(40), nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(300), default="")  # file:line it came from
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Task(LabelBase):
    __tablename__ = "label_tasks"
    __table_args__ = (UniqueConstraint("prompt_id", "kind", name="uq_label_tasks_prompt_kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("label_projects.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("label_prompts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Answer(LabelBase):
    __tablename__ = "label_answers"
    __table_args__ = (UniqueConstraint("task_id", "position", name="uq_label_answers_task_position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("label_tasks.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(300), default="")
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(LabelBase):
    __tablename__ = "label_assignments"
    __table_args__ = (UniqueConstraint("task_id", "user_id", name="uq_label_assignments_task_user"),
                      UniqueConstraint("task_id", "slot", name="uq_label_assignments_task_slot"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("label_tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("label_users.id", ondelete="CASCADE"), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="open")  # open | done | skipped
    order: Mapped[list] = mapped_column(JSON, default=list)  # answer ids in the order this labeler sees them
    draft: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Demonstration(LabelBase):
    __tablename__ = "label_demonstrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("label_assignments.id", ondelete="CASCADE"), unique=True)
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Ranking(LabelBase):
    __tablename__ = "label_rankings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("label_assignments.id", ondelete="CASCADE"), unique=True)
    answer_ids: Mapped[list] = mapped_column(JSON)  # every shown answer, by the task's answer position
    ranks: Mapped[list] = mapped_column(JSON)  # ranks[i] for answer_ids[i]: 0 = best, equal = tie; [] if none given
    none_acceptable: Mapped[bool] = mapped_column(Boolean, default=False)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Rating(LabelBase):
    __tablename__ = "label_ratings"
    __table_args__ = (UniqueConstraint("assignment_id", "answer_id", name="uq_label_ratings_assignment_answer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("label_assignments.id", ondelete="CASCADE"), index=True)
    answer_id: Mapped[int] = mapped_column(ForeignKey("label_answers.id", ondelete="CASCADE"))
    likert: Mapped[int] = mapped_column(Integer)
    flags: Mapped[dict] = mapped_column(JSON, default=dict)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
