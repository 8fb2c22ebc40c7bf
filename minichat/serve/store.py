"""The conversation and feedback store: SQLAlchemy models, Alembic migrations, and the operations the server uses.

SQLite by default (a file in the user's data directory, created on first use), or any SQLAlchemy URL
(e.g. postgresql+psycopg://user@host/db). The schema is versioned by Alembic; `Store(url)` upgrades the
database to the newest revision on open, so an old file keeps working after an upgrade of minichat.

Tables (revisions 0001-0005):
    conversations          one chat: title, model, system prompt, sampling settings, current leaf message
    messages               a tree per conversation (parent_id): editing a user message or regenerating an
                           answer adds a sibling, so every version is kept; the page shows the path to the leaf
    moderation_decisions   every moderation verdict on the chat path (input or output), with what was done
    feedback               thumbs up/down (+1/-1) and an optional comment, one row per message and user
    comparisons            "answer A was better than answer B" for two answers to the same user message
    responses              the Responses API's answers (0002): the response body and the conversation up to it,
                           for previous_response_id and GET /v1/responses/{id}, per API key
    files, batches         the Files and Batch APIs (0003): uploaded and result files (their bytes in the
                           database), and each batch's object as the API returns it, per API key
    fine_tuning_jobs       the fine-tuning API (0004): each job's object and its events, per API key
    api_conversations      the Conversations API (0005): a conversation's object and its items, per API key
                           (the web chat's own conversations are the tables above)

Adding tables (e.g. the labeling app): declare models on `Base` from this module, and put Alembic revisions
in another folder with their own branch label that `depends_on` this module's head; pass that folder in
`Store(url, version_locations=[...])`. Store upgrades to all heads, so the branches apply independently.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (
    JSON, Boolean, DateTime, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Text, UniqueConstraint,
    create_engine, event, select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from minichat.errors import MinichatError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
HEAD_REVISION = "0005"  # this module's newest revision; a test checks the models match the migrated schema

# Constraint names must be deterministic for migrations (and for SQLite's batch mode to alter tables later).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def utcnow() -> dt.datetime:
    # Naive UTC everywhere: SQLite keeps no time zone, and mixing aware and naive values breaks comparisons.
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    model: Mapped[str] = mapped_column(String(200), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # temperature, top_p, max_tokens, ...
    current_leaf_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the shown branch's end
    source: Mapped[str] = mapped_column(String(20), default="web")  # web | api
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), nullable=True)
    role: Mapped[str] = mapped_column(String(20))
    content: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    settings: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # sampling used for this answer
    finish_reason: Mapped[str | None] = mapped_column(String(20), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    moderated: Mapped[bool] = mapped_column(Boolean, default=False)  # content is a moderation refusal
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ModerationDecision(Base):
    __tablename__ = "moderation_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), nullable=True, index=True)
    message_id: Mapped[str | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str] = mapped_column(String(20))  # input | output | api
    flagged: Mapped[bool] = mapped_column(Boolean)
    categories: Mapped[list] = mapped_column(JSON, default=list)  # flagged category names
    scores: Mapped[dict] = mapped_column(JSON, default=dict)
    rules: Mapped[list] = mapped_column(JSON, default=list)  # ids of the rules that fired
    action: Mapped[str] = mapped_column(String(20))  # allowed | refused (input) | replaced (output)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("message_id", "user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    user: Mapped[str] = mapped_column(String(200), default="")
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)  # +1 thumbs up, -1 thumbs down
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Comparison(Base):
    __tablename__ = "comparisons"
    __table_args__ = (Index("ix_comparisons_parent_user", "parent_id", "user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    parent_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))  # the user message
    chosen_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    rejected_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    user: Mapped[str] = mapped_column(String(200), default="")
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class StoredResponse(Base):
    __tablename__ = "responses"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the API key's owner, None without keys
    body: Mapped[dict] = mapped_column(JSON)  # the response as the API returned it
    conversation: Mapped[list] = mapped_column(JSON)  # chat messages up to and including its answer
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class StoredFile(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class StoredBatch(Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    body: Mapped[dict] = mapped_column(JSON)  # the batch object as the API returns it
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class StoredFineTune(Base):
    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    body: Mapped[dict] = mapped_column(JSON)  # the job object (and the runner's own "_" keys)
    events: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class StoredConversation(Base):
    __tablename__ = "api_conversations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    body: Mapped[dict] = mapped_column(JSON)  # the conversation object
    items: Mapped[list] = mapped_column(JSON)  # Responses items, oldest first
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class NotFound(MinichatError):
    """A conversation or message id that is not in the store."""


def _owned(s: Session, model, rid: str, owner: str | None, what: str):
    """The row `rid` of an API table if it belongs to this owner (an API key's fingerprint, or None); NotFound
    otherwise, so a key cannot tell another key's objects from missing ones."""
    row = s.get(model, rid)
    if row is None or row.owner != owner:
        raise NotFound(f"no {what} {rid!r}")
    return row


def _defer_content():
    from sqlalchemy.orm import defer

    return defer(StoredFile.content)  # listing files must not read every file's bytes


def default_url() -> str:
    """sqlite file in the user data directory ($MINICHAT_DATA_DIR overrides), created on first use."""
    env = os.environ.get("MINICHAT_DATA_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir("minichat", appauthor=False))
    return f"sqlite:///{root / 'minichat.db'}"


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() + "Z" if t is not None else None


def _title_from(text: str) -> str:
    t = " ".join(text.split())
    return (t[:60] + "…") if len(t) > 60 else (t or "New chat")


class Store:
    """Thread-safe operations on the store (one short transaction each); every method returns plain dicts."""

    def __init__(self, url: str | None = None, *, migrate: bool = True, version_locations: list[str] | None = None,
                 echo: bool = False):
        self.url = url or default_url()
        self.version_locations = [str(MIGRATIONS_DIR / "versions")] + [str(v) for v in version_locations or []]
        self.engine = _make_engine(self.url, echo)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._session, "before_flush", _check_lengths)
        self._lock = threading.Lock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()
        if migrate:
            self.migrate()

    # ------------------------------------------------------------------ schema
    def _alembic_config(self, connection=None):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        # alembic splits version_locations on this separator; paths with spaces must survive it
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("version_locations", os.pathsep.join(self.version_locations))
        cfg.attributes["connection"] = connection
        return cfg

    def migrate(self, revision: str = "heads") -> None:
        """Upgrade the schema to `revision` (default: every branch's newest)."""
        from alembic import command

        try:
            with self.engine.begin() as conn:
                command.upgrade(self._alembic_config(conn), revision)
        except SQLAlchemyError as e:
            raise MinichatError(f"cannot open or migrate the store at {self.safe_url}: {e}") from None

    def revision(self) -> set[str]:
        """The schema revisions the database is at (one per branch)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._lock, self._session() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    # ------------------------------------------------------------------ conversations
    def create_conversation(self, *, title: str | None = None, model: str = "", system_prompt: str = "",
                            settings: dict | None = None, source: str = "web", owner: str | None = None) -> dict:
        with self.session() as s:
            c = Conversation(title=title or "New chat", model=model, system_prompt=system_prompt or "",
                             settings=dict(settings or {}), source=source, owner=owner)
            s.add(c)
            s.flush()
            return self._conv_dict(c)

    def list_conversations(self, *, owner: str | None = None, limit: int = 100, offset: int = 0,
                           source: str | None = None) -> list[dict]:
        with self.session() as s:
            q = select(Conversation).order_by(Conversation.updated_at.desc()).limit(limit).offset(offset)
            if owner is not None:
                q = q.where(Conversation.owner == owner)
            if source is not None:
                q = q.where(Conversation.source == source)
            return [self._conv_dict(c) for c in s.scalars(q)]

    def _get_conv(self, s: Session, conversation_id: str, owner: str | None = None) -> Conversation:
        c = s.get(Conversation, conversation_id)
        if c is None or (owner is not None and c.owner != owner):
            raise NotFound(f"no conversation {conversation_id!r}")
        return c

    def get_conversation(self, conversation_id: str, *, owner: str | None = None) -> dict:
        """The conversation with all its messages (the whole tree) and the path from the root to the leaf."""
        with self.session() as s:
            c = self._get_conv(s, conversation_id, owner)
            msgs = list(s.scalars(select(Message).where(Message.conversation_id == c.id)
                                  .order_by(Message.created_at, Message.id)))
            fb = {f.message_id: f for f in s.scalars(
                select(Feedback).join(Message, Feedback.message_id == Message.id)
                .where(Message.conversation_id == c.id))}
            verdicts = {d.message_id: {"source": d.source, "categories": d.categories, "action": d.action}
                        for d in s.scalars(select(ModerationDecision)
                                           .where(ModerationDecision.conversation_id == c.id,
                                                  ModerationDecision.flagged.is_(True)))
                        if d.message_id}
            out = self._conv_dict(c)
            out["messages"] = [self._msg_dict(m, fb.get(m.id)) for m in msgs]
            for d in out["messages"]:
                if d["id"] in verdicts:
                    d["moderation"] = verdicts[d["id"]]
            out["path"] = self._path_ids({m.id: m for m in msgs}, c.current_leaf_id)
            return out

    def update_conversation(self, conversation_id: str, *, owner: str | None = None, **fields: Any) -> dict:
        allowed = {"title", "model", "system_prompt", "settings", "current_leaf_id"}
        bad = set(fields) - allowed
        if bad:
            raise MinichatError(f"cannot update conversation fields {sorted(bad)}; allowed: {sorted(allowed)}")
        with self.session() as s:
            c = self._get_conv(s, conversation_id, owner)
            if fields.get("current_leaf_id") is not None:
                m = s.get(Message, fields["current_leaf_id"])
                if m is None or m.conversation_id != c.id:
                    raise NotFound(f"no message {fields['current_leaf_id']!r} in conversation {c.id}")
            for k, v in fields.items():
                setattr(c, k, v)
            c.updated_at = utcnow()
            s.flush()
            return self._conv_dict(c)

    def delete_conversation(self, conversation_id: str, *, owner: str | None = None) -> None:
        with self.session() as s:
            c = self._get_conv(s, conversation_id, owner)
            # children first: not every backend enforces ON DELETE CASCADE (SQLite needs a pragma per connection)
            ids = [m for m in s.scalars(select(Message.id).where(Message.conversation_id == c.id))]
            for model in (ModerationDecision,):
                s.query(model).filter(model.conversation_id == c.id).delete(synchronize_session=False)
            s.query(Comparison).filter(Comparison.conversation_id == c.id).delete(synchronize_session=False)
            if ids:
                s.query(Feedback).filter(Feedback.message_id.in_(ids)).delete(synchronize_session=False)
                s.query(Message).filter(Message.conversation_id == c.id).update({"parent_id": None},
                                                                                synchronize_session=False)
                s.query(Message).filter(Message.conversation_id == c.id).delete(synchronize_session=False)
            s.delete(c)

    # ------------------------------------------------------------------ messages
    def add_message(self, conversation_id: str, *, role: str, content: str, parent_id: str | None = None,
                    owner: str | None = None, make_current: bool = True, **meta: Any) -> dict:
        """Append a message under `parent_id` (None: a new root); it becomes the conversation's shown leaf."""
        if role not in ("system", "developer", "user", "assistant"):
            raise MinichatError(f"role must be system, developer, user or assistant, got {role!r}")
        with self.session() as s:
            c = self._get_conv(s, conversation_id, owner)
            if parent_id is not None:
                p = s.get(Message, parent_id)
                if p is None or p.conversation_id != c.id:
                    raise NotFound(f"no message {parent_id!r} in conversation {c.id}")
            m = Message(conversation_id=c.id, parent_id=parent_id, role=role, content=content, **meta)
            s.add(m)
            s.flush()
            if make_current:
                c.current_leaf_id = m.id
            if role == "user" and c.title in ("", "New chat"):
                c.title = _title_from(content)
            c.updated_at = utcnow()
            return self._msg_dict(m)

    def update_message(self, message_id: str, **fields: Any) -> dict:
        allowed = {"content", "finish_reason", "prompt_tokens", "completion_tokens", "moderated", "model", "settings"}
        bad = set(fields) - allowed
        if bad:
            raise MinichatError(f"cannot update message fields {sorted(bad)}")
        with self.session() as s:
            m = s.get(Message, message_id)
            if m is None:
                raise NotFound(f"no message {message_id!r}")
            for k, v in fields.items():
                setattr(m, k, v)
            s.flush()
            return self._msg_dict(m)

    def get_message(self, message_id: str) -> dict:
        with self.session() as s:
            m = s.get(Message, message_id)
            if m is None:
                raise NotFound(f"no message {message_id!r}")
            return self._msg_dict(m)

    def thread(self, message_id: str) -> list[dict]:
        """The messages from the root down to `message_id` (what the model sees when answering after it)."""
        with self.session() as s:
            m = s.get(Message, message_id)
            if m is None:
                raise NotFound(f"no message {message_id!r}")
            chain = []
            while m is not None:
                chain.append(self._msg_dict(m))
                m = s.get(Message, m.parent_id) if m.parent_id else None
            return chain[::-1]

    # ------------------------------------------------------------------ moderation and feedback
    def record_moderation(self, *, source: str, flagged: bool, action: str, categories: list[str] | None = None,
                          scores: dict | None = None, rules: list[str] | None = None,
                          conversation_id: str | None = None, message_id: str | None = None,
                          request_id: str | None = None) -> int:
        with self.session() as s:
            d = ModerationDecision(source=source, flagged=flagged, action=action, categories=list(categories or []),
                                   scores=dict(scores or {}), rules=list(rules or []),
                                   conversation_id=conversation_id, message_id=message_id, request_id=request_id)
            s.add(d)
            s.flush()
            return d.id

    def moderation_decisions(self, *, conversation_id: str | None = None, limit: int = 1000) -> list[dict]:
        with self.session() as s:
            q = select(ModerationDecision).order_by(ModerationDecision.id).limit(limit)
            if conversation_id is not None:
                q = q.where(ModerationDecision.conversation_id == conversation_id)
            return [{"id": d.id, "conversation_id": d.conversation_id, "message_id": d.message_id,
                     "request_id": d.request_id, "source": d.source, "flagged": d.flagged,
                     "categories": d.categories, "scores": d.scores, "rules": d.rules, "action": d.action,
                     "created_at": _iso(d.created_at)} for d in s.scalars(q)]

    def set_feedback(self, message_id: str, *, rating: int | None = None, comment: str | None = None,
                     user: str = "") -> dict:
        """Thumbs up (+1) / down (-1) / cleared (None) and a comment, for an assistant message; one per user."""
        if rating not in (None, 1, -1):
            raise MinichatError(f"rating must be 1 (thumbs up), -1 (thumbs down) or null, got {rating!r}")
        with self.session() as s:
            m = s.get(Message, message_id)
            if m is None:
                raise NotFound(f"no message {message_id!r}")
            if m.role != "assistant":
                raise MinichatError("feedback is given on assistant messages only")
            f = s.scalars(select(Feedback).where(Feedback.message_id == m.id, Feedback.user == user)).first()
            if f is None:
                f = Feedback(message_id=m.id, user=user)
                s.add(f)
            f.rating, f.comment, f.updated_at = rating, comment, utcnow()
            s.flush()
            return {"message_id": m.id, "rating": f.rating, "comment": f.comment, "user": f.user}

    def add_comparison(self, chosen_id: str, rejected_id: str, *, user: str = "", comment: str | None = None) -> dict:
        """Record that `chosen_id` was the better of two answers to the same user message."""
        if chosen_id == rejected_id:
            raise MinichatError("a comparison needs two different answers")
        with self.session() as s:
            a, b = s.get(Message, chosen_id), s.get(Message, rejected_id)
            for mid, m in ((chosen_id, a), (rejected_id, b)):
                if m is None:
                    raise NotFound(f"no message {mid!r}")
                if m.role != "assistant":
                    raise MinichatError(f"message {mid} is not an assistant answer")
            if a.parent_id != b.parent_id or a.parent_id is None:
                raise MinichatError("the two answers must reply to the same message (regenerations of one answer)")
            # one verdict per pair and user: a new choice replaces the old one
            s.query(Comparison).filter(
                Comparison.user == user,
                ((Comparison.chosen_id == a.id) & (Comparison.rejected_id == b.id))
                | ((Comparison.chosen_id == b.id) & (Comparison.rejected_id == a.id)),
            ).delete(synchronize_session=False)
            c = Comparison(conversation_id=a.conversation_id, parent_id=a.parent_id, chosen_id=a.id,
                           rejected_id=b.id, user=user, comment=comment)
            s.add(c)
            s.flush()
            return {"id": c.id, "chosen_id": a.id, "rejected_id": b.id, "parent_id": a.parent_id}

    # ------------------------------------------------------------------ export
    def preference_pairs(self, *, include_thumbs: bool = True, since: dt.datetime | None = None,
                         include_moderated: bool = False) -> Iterator[dict]:
        """(prompt thread, chosen, rejected) from explicit comparisons and, when include_thumbs, from sibling
        answers of which one got thumbs up and another thumbs down. Prompts include the system prompt."""
        with self.session() as s:
            q = select(Comparison).order_by(Comparison.id)
            if since is not None:
                q = q.where(Comparison.created_at >= since)
            seen: set[tuple[str, str]] = set()
            pairs: list[tuple[str, str, str, str, str]] = []  # conversation, parent, chosen, rejected, source
            for c in s.scalars(q):
                pairs.append((c.conversation_id, c.parent_id, c.chosen_id, c.rejected_id, "comparison"))
                seen.add((c.chosen_id, c.rejected_id))
            if include_thumbs:
                q = (select(Feedback, Message).join(Message, Feedback.message_id == Message.id)
                     .where(Feedback.rating.is_not(None), Message.parent_id.is_not(None)))
                if since is not None:
                    q = q.where(Feedback.updated_at >= since)
                by_parent: dict[str, dict[int, list[Message]]] = {}
                for f, m in s.execute(q):
                    by_parent.setdefault(m.parent_id, {}).setdefault(f.rating, []).append(m)
                for parent, groups in by_parent.items():
                    for good in groups.get(1, []):
                        for bad in groups.get(-1, []):
                            if good.id == bad.id or (good.id, bad.id) in seen or (bad.id, good.id) in seen:
                                continue
                            seen.add((good.id, bad.id))
                            pairs.append((good.conversation_id, parent, good.id, bad.id, "thumbs"))
            for conv_id, parent_id, chosen_id, rejected_id, source in pairs:
                conv = s.get(Conversation, conv_id)
                chosen, rejected = s.get(Message, chosen_id), s.get(Message, rejected_id)
                if conv is None or chosen is None or rejected is None:
                    continue
                if not include_moderated and (chosen.moderated or rejected.moderated):
                    continue  # a refusal written by moderation is not the model's answer to learn from
                chain, m = [], s.get(Message, parent_id)
                while m is not None:
                    chain.append({"role": m.role, "content": m.content})
                    m = s.get(Message, m.parent_id) if m.parent_id else None
                prompt = chain[::-1]
                if conv.system_prompt and not (prompt and prompt[0]["role"] in ("system", "developer")):
                    prompt.insert(0, {"role": "system", "content": conv.system_prompt})
                yield {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen.content}],
                    "rejected": [{"role": "assistant", "content": rejected.content}],
                    "meta": {"source": source, "conversation_id": conv_id, "chosen_id": chosen_id,
                             "rejected_id": rejected_id, "chosen_model": chosen.model,
                             "rejected_model": rejected.model},
                }

    # ------------------------------------------------------------------ responses (the Responses API)
    def put_response(self, body: dict, conversation: list[dict], owner: str | None) -> None:
        with self.session() as s:
            s.merge(StoredResponse(id=body["id"], owner=owner, body=body, conversation=conversation))

    def get_response(self, response_id: str, owner: str | None) -> tuple[dict, list[dict]]:
        """(body, conversation) of a stored response of this owner; NotFound otherwise."""
        with self.session() as s:
            r = _owned(s, StoredResponse, response_id, owner, "response")
            return r.body, r.conversation

    def delete_response(self, response_id: str, owner: str | None) -> None:
        with self.session() as s:
            r = _owned(s, StoredResponse, response_id, owner, "response")
            s.delete(r)

    # ------------------------------------------------------------------ files and batches (serve/batches.py)
    def put_file(self, meta: dict, content: bytes, owner: str | None) -> None:
        with self.session() as s:  # created_at to the microsecond: files list in the order they were made
            s.add(StoredFile(id=meta["id"], owner=owner, filename=meta["filename"], purpose=meta["purpose"],
                             bytes=len(content), content=content, created_at=utcnow()))

    @staticmethod
    def _file_meta(f: StoredFile) -> dict:
        return {"id": f.id, "object": "file", "bytes": f.bytes, "filename": f.filename, "purpose": f.purpose,
                "created_at": int(f.created_at.replace(tzinfo=dt.timezone.utc).timestamp()), "status": "processed"}

    def get_file(self, file_id: str, owner: str | None, content: bool = False) -> tuple[dict, bytes | None]:
        with self.session() as s:
            f = _owned(s, StoredFile, file_id, owner, "file")
            return self._file_meta(f), (bytes(f.content) if content else None)

    def list_files(self, owner: str | None, purpose: str | None = None) -> list[dict]:
        """This owner's files, oldest first (the caller pages)."""
        with self.session() as s:
            q = select(StoredFile).where(StoredFile.owner.is_(None) if owner is None else StoredFile.owner == owner)
            if purpose:
                q = q.where(StoredFile.purpose == purpose)
            return [self._file_meta(f) for f in s.scalars(q.order_by(StoredFile.created_at, StoredFile.id)
                                                            .options(_defer_content()))]

    def delete_file(self, file_id: str, owner: str | None) -> None:
        with self.session() as s:
            f = _owned(s, StoredFile, file_id, owner, "file")
            s.delete(f)

    def put_batch(self, body: dict, owner: str | None) -> None:
        """Insert, or update the body (created_at stays the first write's, to the microsecond, for ordering)."""
        with self.session() as s:
            b = s.get(StoredBatch, body["id"])
            if b is None:
                s.add(StoredBatch(id=body["id"], owner=owner, body=body, created_at=utcnow()))
            else:
                b.body = body

    def get_batch(self, batch_id: str, owner: str | None) -> dict:
        with self.session() as s:
            b = _owned(s, StoredBatch, batch_id, owner, "batch")
            return dict(b.body)

    def list_batches(self, owner: str | None = None, *, everyone: bool = False) -> list[tuple[str | None, dict]]:
        """(owner, body) of this owner's batches (or everyone's), oldest first."""
        with self.session() as s:
            q = select(StoredBatch)
            if not everyone:
                q = q.where(StoredBatch.owner.is_(None) if owner is None else StoredBatch.owner == owner)
            return [(b.owner, dict(b.body)) for b in s.scalars(q.order_by(StoredBatch.created_at, StoredBatch.id))]

    def put_fine_tune(self, body: dict, owner: str | None, events: list[dict]) -> None:
        with self.session() as s:
            j = s.get(StoredFineTune, body["id"])
            if j is None:
                s.add(StoredFineTune(id=body["id"], owner=owner, body=body, events=events, created_at=utcnow()))
            else:
                j.body, j.events = body, events

    def get_fine_tune(self, job_id: str, owner: str | None) -> tuple[dict, list[dict]]:
        with self.session() as s:
            j = _owned(s, StoredFineTune, job_id, owner, "fine-tuning job")
            return dict(j.body), list(j.events)

    def list_fine_tunes(self, owner: str | None = None, *, everyone: bool = False) -> list[tuple[str | None, dict]]:
        with self.session() as s:
            q = select(StoredFineTune)
            if not everyone:
                q = q.where(StoredFineTune.owner.is_(None) if owner is None else StoredFineTune.owner == owner)
            return [(j.owner, dict(j.body)) for j in s.scalars(q.order_by(StoredFineTune.created_at, StoredFineTune.id))]

    def put_api_conversation(self, body: dict, items: list[dict], owner: str | None) -> None:
        with self.session() as s:
            c = s.get(StoredConversation, body["id"])
            if c is None:
                s.add(StoredConversation(id=body["id"], owner=owner, body=body, items=items, created_at=utcnow()))
            else:
                c.body, c.items = body, items

    def get_api_conversation(self, conv_id: str, owner: str | None) -> tuple[dict, list[dict]]:
        with self.session() as s:
            c = _owned(s, StoredConversation, conv_id, owner, "conversation")
            return dict(c.body), list(c.items)

    def delete_api_conversation(self, conv_id: str, owner: str | None) -> None:
        with self.session() as s:
            c = _owned(s, StoredConversation, conv_id, owner, "conversation")
            s.delete(c)

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.session() as s:
            out = {t.__tablename__: s.scalar(select(func.count()).select_from(t)) or 0
                   for t in (Conversation, Message, Feedback, Comparison, ModerationDecision)}
            out["thumbs_up"] = s.scalar(select(func.count()).select_from(Feedback).where(Feedback.rating == 1)) or 0
            out["thumbs_down"] = s.scalar(select(func.count()).select_from(Feedback).where(Feedback.rating == -1)) or 0
            return out

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _path_ids(by_id: dict[str, Message], leaf: str | None) -> list[str]:
        out = []
        while leaf is not None and leaf in by_id and len(out) <= len(by_id):
            out.append(leaf)
            leaf = by_id[leaf].parent_id
        return out[::-1]

    @staticmethod
    def _conv_dict(c: Conversation) -> dict:
        return {"id": c.id, "title": c.title, "model": c.model, "system_prompt": c.system_prompt,
                "settings": dict(c.settings or {}), "current_leaf_id": c.current_leaf_id, "source": c.source,
                "owner": c.owner, "created_at": _iso(c.created_at), "updated_at": _iso(c.updated_at)}

    @staticmethod
    def _msg_dict(m: Message, fb: Feedback | None = None) -> dict:
        d = {"id": m.id, "conversation_id": m.conversation_id, "parent_id": m.parent_id, "role": m.role,
             "content": m.content, "model": m.model, "settings": m.settings, "finish_reason": m.finish_reason,
             "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens, "moderated": m.moderated,
             "created_at": _iso(m.created_at)}
        if fb is not None:
            d["feedback"] = {"rating": fb.rating, "comment": fb.comment}
        return d


def _check_lengths(session: Session, flush_context, instances) -> None:
    """Refuse a string longer than its column before anything is written, on every backend alike: PostgreSQL
    would fail the transaction with a driver error, and SQLite would keep the whole string."""
    from sqlalchemy import inspect as sa_inspect

    for obj in (*session.new, *session.dirty):
        for attr in sa_inspect(obj).mapper.column_attrs:
            limit = getattr(attr.columns[0].type, "length", None)
            value = getattr(obj, attr.key, None)
            if limit and isinstance(value, str) and len(value) > limit:
                raise MinichatError(f"{obj.__tablename__}.{attr.key} takes at most {limit} characters, got "
                                    f"{len(value)}: {value[:40]!r}...")


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL holds no password we could find
        return url


def _make_engine(url: str, echo: bool) -> Engine:
    try:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            path = Path(url[len("sqlite:///"):]).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        kwargs: dict[str, Any] = {"echo": echo}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url in ("sqlite://", "sqlite:///:memory:"):
                from sqlalchemy.pool import StaticPool

                kwargs["poolclass"] = StaticPool  # one shared connection, or every session sees an empty database
        engine = create_engine(url, **kwargs)
    except ImportError as e:  # the URL's driver (e.g. psycopg for postgresql+psycopg://) is not installed
        hint = (" (PostgreSQL: pip install 'minichat[postgres]' and a postgresql+psycopg:// URL)"
                if url.startswith("postgres") else "")
        raise MinichatError(f"cannot use store URL {_hide_password(url)!r}: {e}{hint}") from None
    except (SQLAlchemyError, ValueError) as e:
        raise MinichatError(f"cannot use store URL {_hide_password(url)!r}: {e}") from None
    except OSError as e:
        raise MinichatError(f"cannot create the store's folder for {url!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # per connection: WAL for concurrent readers, real FKs
            cur = dbapi_conn.cursor()
            if ":memory:" not in url:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine
