"""The labeling app's logic on the serving store: accounts, projects, prompt import, task assignment with
overlap, submissions (validated, idempotent under concurrency), the dashboard with inter-labeler agreement,
and the rows of the training exports.

Every operation is one short transaction (`Store.session()`). Writes are guarded by unique constraints rather
than by read-then-write checks: when two processes race (e.g. a double-clicked submit, or two labelers taking
the last overlap slot of a task), one of them hits the constraint and retries, and the retry sees the other's
row and updates it. So a record is never lost and never duplicated, on SQLite as on PostgreSQL.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import random
import secrets
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from minichat.errors import ConfigError, MinichatError
from minichat.label.models import (
    CATEGORIES, FLAGS, ROLES, TASK_KINDS, Answer, Assignment, Demonstration, Project, Prompt, Ranking, Rating, Task,
    User,
)
from minichat.label.models import Session as LoginSession
from minichat.serve.store import NotFound, Store, utcnow

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
HEAD_REVISION = "l001"
PBKDF2_ITERATIONS = 120_000
T = TypeVar("T")


class Unauthorized(MinichatError):
    """No valid login (HTTP 401)."""


class Forbidden(MinichatError):
    """Logged in, but not allowed (HTTP 403): another labeler's work, or an admin-only action."""


@dataclass
class ProjectConfig:
    """A labeling project's settings (stored with the project as JSON)."""

    tasks: list[str] = field(default_factory=lambda: ["demonstration", "ranking"])  # of demonstration|ranking|rating
    # sampled from, the answers of a task split among them; may be empty when answers come with the prompts
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    k: int = 4  # answers per ranking task (InstructGPT: 4 to 9)
    rate_answers: int = 1  # answers per rating task
    overlap: int = 1  # labelers per task (>= 2 to measure agreement)
    labelers: list[str] = field(default_factory=list)  # who may work on it; empty: every labeler
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASK_KINDS]
        if bad or not self.tasks:
            raise ConfigError(f"tasks must be a non-empty list of {', '.join(TASK_KINDS)} (got {self.tasks})")
        if not 4 <= self.k <= 9:
            raise ConfigError(f"k (answers per ranking) must be 4..9 as in InstructGPT, got {self.k}")
        if not 1 <= self.rate_answers <= 9:
            raise ConfigError(f"rate_answers must be 1..9, got {self.rate_answers}")
        if self.overlap < 1:
            raise ConfigError(f"overlap must be >= 1, got {self.overlap}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.max_tokens >= 1):
            raise ConfigError("temperature >= 0, 0 < top_p <= 1 and max_tokens >= 1 are required")

    def answers_for(self, kind: str) -> int:
        return {"ranking": self.k, "rating": self.rate_answers}.get(kind, 0)


def ensure_schema(store: Store) -> None:
    """Create or upgrade the labeling tables in the store's database (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    try:
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")
    except Exception as e:  # alembic and the driver raise many kinds; all mean the same to the user
        raise MinichatError(f"cannot create the labeling tables in {store.safe_url}: {e}") from None


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    h = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, PBKDF2_ITERATIONS)
    return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${salt.hex()}${h.hex()}"


def check_secret(secret: str, stored: str) -> bool:
    try:
        _, iters, salt, h = stored.split("$")
        got = hashlib.pbkdf2_hmac("sha256", secret.encode(), bytes.fromhex(salt), int(iters))
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), h)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() + "Z" if t is not None else None


# ---------------------------------------------------------------------------------------------- pure functions

def ranks_from_groups(groups, shown: list[int]) -> list[int]:
    """A ranking given as groups best to worst (ties share a group) -> one rank per shown answer, in `shown`
    order. The groups must hold every shown answer exactly once: a permutation, with ties."""
    if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
        raise MinichatError("ranking must be a list of groups of answer ids, best first, e.g. [[12], [10, 13], [11]] "
                            "(answers in one group are tied)")
    place: dict[int, int] = {}
    for r, g in enumerate(groups):
        for a in g:
            if not isinstance(a, int) or isinstance(a, bool):
                raise MinichatError(f"ranking: answer ids must be integers, got {a!r}")
            if a not in shown:
                raise MinichatError(f"ranking: answer {a} is not one of the answers shown ({', '.join(map(str, shown))})")
            if a in place:
                raise MinichatError(f"ranking: answer {a} appears more than once; each answer gets exactly one place")
            place[a] = r
    missing = [a for a in shown if a not in place]
    if missing:
        raise MinichatError(f"ranking: answer(s) {', '.join(map(str, missing))} not ranked; rank all "
                            f"{len(shown)} answers (ties allowed), mark none acceptable, or skip")
    if len(groups) < 2:
        raise MinichatError("ranking: all answers are tied, which says nothing; order them, or skip")
    return [place[a] for a in shown]


def pair_agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """Agreement of two rankings of the same answers over answer pairs: pairs that at least one of them ordered
    count; the same order scores 1, a tie against an order 1/2, opposite orders 0. Returns (score, pairs)."""
    score, n = 0.0, 0
    for i, j in combinations(range(len(a)), 2):
        sa = (a[i] > a[j]) - (a[i] < a[j])
        sb = (b[i] > b[j]) - (b[i] < b[j])
        if sa == 0 and sb == 0:
            continue
        n += 1
        score += 1.0 if sa == sb else 0.5 if sa == 0 or sb == 0 else 0.0
    return score, n


def rating_agreement(units: list[list[int]]) -> dict:
    """Agreement of Likert ratings: `units` holds, per answer, the ratings several labelers gave it (answers
    rated once are left out). Over pairs of ratings of one answer: the share that are equal, the share within one
    point, the mean absolute difference; and Krippendorff's alpha for interval data,
    1 − D_o / D_e, where D_o is the mean squared difference within an answer and D_e across all its ratings
    (1 = perfect, 0 = chance)."""
    units = [u for u in units if len(u) >= 2]
    pairs = [(a, b) for u in units for a, b in combinations(u, 2)]
    if not pairs:
        return {"answers": 0, "pairs": 0, "exact": None, "within_one": None, "mean_abs_diff": None, "alpha": None}
    values = [v for u in units for v in u]
    n = len(values)
    # Krippendorff: each unit's ordered pairs weighted by 1 / (m_u − 1); D_e over all ordered pairs of values
    d_o = sum(2 * sum((a - b) ** 2 for a, b in combinations(u, 2)) / (len(u) - 1) for u in units) / n
    d_e = sum(2 * (a - b) ** 2 for a, b in combinations(values, 2)) / (n * (n - 1))
    return {"answers": len(units), "pairs": len(pairs),
            "exact": sum(a == b for a, b in pairs) / len(pairs),
            "within_one": sum(abs(a - b) <= 1 for a, b in pairs) / len(pairs),
            "mean_abs_diff": sum(abs(a - b) for a, b in pairs) / len(pairs),
            "alpha": (1.0 - d_o / d_e) if d_e > 0 else None}


def strict_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of a ranking; ties give none."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i) for i, j in combinations(range(len(ranks)), 2)
            if ranks[i] != ranks[j]]


# ---------------------------------------------------------------------------------------------- the service

def _hours(td: dt.timedelta) -> str:
    h = td.total_seconds() / 3600
    return f"{h / 24:g} days" if h >= 48 else f"{h:g} hours"


class Labeling:
    """The labeling app on a serving `Store` (whose tables it extends on open)."""

    def __init__(self, store: Store, migrate: bool = True, retries: int = 20, session_hours: float = 14 * 24):
        if session_hours <= 0:
            raise MinichatError(f"session_hours must be positive, got {session_hours}")
        self.store = store
        self.retries = retries
        self.session_ttl = dt.timedelta(hours=session_hours)  # a login lasts this long, then asks again
        if migrate:
            ensure_schema(store)

    # ------------------------------------------------------------------ transactions
    def _tx(self, fn: Callable[[Any], T]) -> T:
        """Run fn(session) in a transaction; retry when a unique constraint shows that a concurrent writer got
        there first (the retry then sees its row) or when another process holds SQLite's write lock."""
        for attempt in range(self.retries):
            try:
                with self.store.session() as s:
                    return fn(s)
            except IntegrityError:
                if attempt == self.retries - 1:
                    raise MinichatError("could not save: the record kept changing under concurrent writes; "
                                        "try again") from None
            except OperationalError as e:
                if "locked" not in str(e).lower() and "busy" not in str(e).lower() and \
                        "deadlock" not in str(e).lower() and "serializ" not in str(e).lower():
                    raise
                if attempt == self.retries - 1:
                    raise MinichatError(f"the store stayed busy: {e.orig}") from None
            time.sleep(0.01 * (attempt + 1) * random.random())
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ users and logins
    @staticmethod
    def _user_dict(u: User) -> dict:
        return {"id": u.id, "name": u.name, "role": u.role, "held_out": u.held_out, "active": u.active,
                "created_at": _iso(u.created_at)}

    def add_user(self, name: str, *, role: str = "labeler", secret: str | None = None,
                 held_out: bool = False) -> tuple[dict, str]:
        """A new account; returns (user, secret): a generated token unless a password was given."""
        name = (name or "").strip()
        if not name or len(name) > 100 or any(c.isspace() for c in name):
            raise MinichatError(f"user name must be 1..100 characters without spaces, got {name!r}")
        if role not in ROLES:
            raise MinichatError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if secret is not None and len(secret) < 8:
            raise MinichatError("a password must have at least 8 characters")
        secret = secret or secrets.token_urlsafe(18)
        hashed = hash_secret(secret)

        def go(s):
            if s.scalars(select(User).where(User.name == name)).first() is not None:
                raise MinichatError(f"user {name!r} already exists")
            u = User(name=name, role=role, secret_hash=hashed, held_out=held_out)
            s.add(u)
            s.flush()
            return self._user_dict(u)

        return self._tx(go), secret

    def update_user(self, name: str, *, role: str | None = None, held_out: bool | None = None,
                    active: bool | None = None, secret: str | None = None) -> dict:
        if role is not None and role not in ROLES:
            raise MinichatError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        hashed = hash_secret(secret) if secret else None

        def go(s):
            u = self._user(s, name)
            if role is not None:
                u.role = role
            if held_out is not None:
                u.held_out = held_out
            if active is not None:
                u.active = active
                if not active:
                    s.query(LoginSession).filter(LoginSession.user_id == u.id).delete()
            if hashed:
                u.secret_hash = hashed
                s.query(LoginSession).filter(LoginSession.user_id == u.id).delete()
            s.flush()
            return self._user_dict(u)

        return self._tx(go)

    def users(self) -> list[dict]:
        with self.store.session() as s:
            return [self._user_dict(u) for u in s.scalars(select(User).order_by(User.id))]

    @staticmethod
    def _user(s, name: str) -> User:
        u = s.scalars(select(User).where(User.name == name)).first()
        if u is None:
            raise NotFound(f"no user {name!r}")
        return u

    def login(self, name: str, secret: str) -> tuple[str, dict]:
        """(session token, user) for a name and its token or password."""
        with self.store.session() as s:
            u = s.scalars(select(User).where(User.name == (name or "").strip())).first()
            user = self._user_dict(u) if u is not None and u.active else None
            stored = u.secret_hash if u is not None else ""
        # the deliberately slow hash runs outside the transaction (and the store's lock)
        if user is None or not check_secret(secret or "", stored):
            raise Unauthorized("wrong name or token/password")
        token = secrets.token_urlsafe(32)

        def go(s):
            s.query(LoginSession).filter(LoginSession.created_at < utcnow() - self.session_ttl).delete()  # old ones
            s.add(LoginSession(token_hash=_token_hash(token), user_id=user["id"]))

        self._tx(go)
        return token, user

    def authenticate(self, token: str | None) -> dict:
        if not token:
            raise Unauthorized("log in first (send 'Authorization: Bearer <session token>')")
        with self.store.session() as s:
            row = s.get(LoginSession, _token_hash(token))
            u = s.get(User, row.user_id) if row is not None else None
            expired = row is not None and row.created_at < utcnow() - self.session_ttl
            if u is not None and u.active and not expired:
                return self._user_dict(u)
        if expired:
            self.logout(token)
            raise Unauthorized(f"the session expired (logins last {_hours(self.session_ttl)}); log in again")
        raise Unauthorized("the session has ended; log in again")

    def logout(self, token: str) -> None:
        self._tx(lambda s: s.query(LoginSession).filter(LoginSession.token_hash == _token_hash(token)).delete())

    # ------------------------------------------------------------------ projects
    @staticmethod
    def _config(p: Project) -> ProjectConfig:
        from minichat import config as C

        return C.from_dict(ProjectConfig, dict(p.settings or {}))

    def _project_dict(self, p: Project, s=None) -> dict:
        return {"id": p.id, "name": p.name, "guidelines": p.guidelines, "settings": dict(p.settings or {}),
                "created_at": _iso(p.created_at)}

    def create_project(self, name: str, cfg: ProjectConfig | None = None, guidelines: str = "") -> dict:
        cfg = cfg or ProjectConfig()
        cfg.validate()
        name = (name or "").strip()
        if not name or len(name) > 100:
            raise MinichatError(f"project name must be 1..100 characters, got {name!r}")

        def go(s):
            if s.scalars(select(Project).where(Project.name == name)).first() is not None:
                raise MinichatError(f"project {name!r} already exists")
            p = Project(name=name, guidelines=guidelines or "", settings=asdict(cfg))
            s.add(p)
            s.flush()
            return self._project_dict(p)

        return self._tx(go)

    def update_project(self, name: str, *, guidelines: str | None = None, cfg: ProjectConfig | None = None) -> dict:
        if cfg is not None:
            cfg.validate()

        def go(s):
            p = self._project(s, name)
            if guidelines is not None:
                p.guidelines = guidelines
            if cfg is not None:
                old = self._config(p)
                if old.k != cfg.k and s.scalar(select(func.count()).select_from(Answer).join(Task, Answer.task_id == Task.id)
                                               .where(Task.project_id == p.id, Task.kind == "ranking")):
                    raise MinichatError("k cannot change once ranking answers exist; make a new project")
                p.settings = asdict(cfg)
            s.flush()
            return self._project_dict(p)

        return self._tx(go)

    @staticmethod
    def _project(s, name_or_id) -> Project:
        p = None
        if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.isdigit()):
            p = s.get(Project, int(name_or_id))
        if p is None:
            p = s.scalars(select(Project).where(Project.name == str(name_or_id))).first()
        if p is None:
            raise NotFound(f"no project {name_or_id!r}")
        return p

    def project(self, name_or_id) -> dict:
        with self.store.session() as s:
            return self._project_dict(self._project(s, name_or_id))

    def project_config(self, name_or_id) -> ProjectConfig:
        with self.store.session() as s:
            return self._config(self._project(s, name_or_id))

    def projects(self, user: dict | None = None) -> list[dict]:
        with self.store.session() as s:
            out = []
            for p in s.scalars(select(Project).order_by(Project.id)):
                if user is not None and not self._may_work_on(user, p):
                    continue
                out.append(self._project_dict(p))
            return out

    def _may_work_on(self, user: dict, p: Project) -> bool:
        allowed = (p.settings or {}).get("labelers") or []
        return user["role"] == "admin" or not allowed or user["name"] in allowed

    # ------------------------------------------------------------------ import
    def import_prompts(self, project, rows) -> dict:
        """Add prompts (importer.PromptRow) and their tasks, in one transaction; imported answers are used for
        ranking/rating tasks (their number must then fit: K for rankings)."""
        cfg = self.project_config(project)
        problems = []
        for r in rows:
            if r.answers and "ranking" in cfg.tasks and len(r.answers) != cfg.k:
                problems.append(f"{r.source}: {len(r.answers)} answers given, but this project ranks K={cfg.k}")
            if any(not a["content"].strip() for a in r.answers):
                problems.append(f"{r.source}: an answer is empty")
        if problems:
            raise MinichatError(f"{len(problems)} malformed line(s), nothing imported:\n  " + "\n  ".join(problems[:20]))

        def go(s):
            p = self._project(s, project)
            counts = {"prompts": 0, "tasks": 0, "answers": 0}
            for r in rows:
                pr = Prompt(project_id=p.id, messages=r.messages, category=r.category, meta=r.meta,
                            source=r.source[-300:])
                s.add(pr)
                s.flush()
                counts["prompts"] += 1
                for kind in cfg.tasks:
                    t = Task(project_id=p.id, prompt_id=pr.id, kind=kind)
                    s.add(t)
                    s.flush()
                    counts["tasks"] += 1
                    want = cfg.answers_for(kind)
                    if want and r.answers:
                        chosen = r.answers[:want]
                        counts["answers"] += self._add_answers(s, t, chosen, seed=t.id)
            return counts

        return self._tx(go)

    # ------------------------------------------------------------------ answers to show
    def tasks_needing_answers(self, project) -> list[dict]:
        """Ranking and rating tasks that have no answers yet: {task_id, kind, messages, n}."""
        with self.store.session() as s:
            p = self._project(s, project)
            cfg = self._config(p)
            have = set(s.scalars(select(Answer.task_id).join(Task, Answer.task_id == Task.id)
                                 .where(Task.project_id == p.id).distinct()))
            out = []
            for t, pr in s.execute(select(Task, Prompt).join(Prompt, Task.prompt_id == Prompt.id)
                                   .where(Task.project_id == p.id, Task.kind.in_(("ranking", "rating")))
                                   .order_by(Task.id)):
                if t.id not in have:
                    out.append({"task_id": t.id, "kind": t.kind, "messages": list(pr.messages),
                                "n": cfg.answers_for(t.kind)})
            return out

    @staticmethod
    def _add_answers(s, t: Task, answers: list[dict], seed: int) -> int:
        order = list(range(len(answers)))
        random.Random(seed).shuffle(order)  # the stored order mixes the models; each labeler also sees its own order
        for pos, i in enumerate(order):
            a = answers[i]
            s.add(Answer(task_id=t.id, position=pos, content=a["content"], model=a.get("model") or "",
                         settings=dict(a.get("settings") or {})))
        s.flush()
        return len(answers)

    def add_answers(self, task_id: int, answers: list[dict]) -> int:
        """Store a task's answers once (a concurrent second call adds nothing: positions are unique)."""
        def go(s):
            t = s.get(Task, task_id)
            if t is None:
                raise NotFound(f"no task {task_id}")
            if s.scalar(select(func.count()).select_from(Answer).where(Answer.task_id == t.id)):
                return 0
            return self._add_answers(s, t, answers, seed=t.id)

        return self._tx(go)

    # ------------------------------------------------------------------ assignment
    def next_assignment(self, user: dict, project, kind: str | None = None) -> dict | None:
        """The labeler's open assignment in the project (work in progress comes back first), else a new one on
        a task that has fewer than `overlap` labelers and not this one; None when nothing is left."""
        if kind is not None and kind not in TASK_KINDS:
            raise MinichatError(f"kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}")

        def go(s):
            p = self._project(s, project)
            if not self._may_work_on(user, p):
                raise Forbidden(f"you are not a labeler of project {p.name!r}")
            cfg = self._config(p)
            kinds = [kind] if kind else list(cfg.tasks)
            q = (select(Assignment).join(Task, Assignment.task_id == Task.id)
                 .where(Assignment.user_id == user["id"], Assignment.status == "open", Task.project_id == p.id,
                        Task.kind.in_(kinds)).order_by(Assignment.id))
            a = s.scalars(q).first()
            if a is not None:
                return a.id
            mine = set(s.scalars(select(Assignment.task_id).where(Assignment.user_id == user["id"])))
            taken = dict(s.execute(select(Assignment.task_id, func.count()).join(Task, Assignment.task_id == Task.id)
                                   .where(Task.project_id == p.id).group_by(Assignment.task_id)).all())
            ready = set(s.scalars(select(Answer.task_id).join(Task, Answer.task_id == Task.id)
                                  .where(Task.project_id == p.id).distinct()))
            for t in s.scalars(select(Task).where(Task.project_id == p.id, Task.kind.in_(kinds)).order_by(Task.id)):
                if t.id in mine or taken.get(t.id, 0) >= cfg.overlap:
                    continue
                if t.kind != "demonstration" and t.id not in ready:
                    continue  # answers not sampled yet
                ids = list(s.scalars(select(Answer.id).where(Answer.task_id == t.id).order_by(Answer.position)))
                random.Random(f"{t.id}/{user['id']}").shuffle(ids)  # each labeler sees the answers in a random order
                # slot: unique per task, so two labelers racing for the last slot cannot both get it
                a = Assignment(task_id=t.id, user_id=user["id"], slot=taken.get(t.id, 0), order=ids)
                s.add(a)
                s.flush()
                return a.id
            return None

        aid = self._tx(go)
        return None if aid is None else self.assignment(user, aid)

    def _assignment(self, s, user: dict, assignment_id: int) -> Assignment:
        a = s.get(Assignment, assignment_id)
        if a is None:
            raise NotFound(f"no assignment {assignment_id}")
        if a.user_id != user["id"] and user["role"] != "admin":
            raise Forbidden(f"assignment {assignment_id} belongs to another labeler")
        return a

    def _view(self, s, a: Assignment) -> dict:
        t = s.get(Task, a.task_id)
        pr = s.get(Prompt, t.prompt_id)
        p = s.get(Project, t.project_id)
        u = s.get(User, a.user_id)
        answers = {x.id: x for x in s.scalars(select(Answer).where(Answer.task_id == t.id))}
        shown = [answers[i] for i in a.order if i in answers]
        out = {"id": a.id, "kind": t.kind, "status": a.status, "task_id": t.id, "prompt_id": pr.id,
               "project": {"id": p.id, "name": p.name}, "labeler": u.name,
               "messages": list(pr.messages), "category": pr.category, "metadata": dict(pr.meta or {}),
               "answers": [{"id": x.id, "label": chr(ord("A") + i), "content": x.content} for i, x in enumerate(shown)],
               "draft": a.draft, "skip_reason": a.skip_reason, "record": None,
               "created_at": _iso(a.created_at), "updated_at": _iso(a.updated_at)}
        if t.kind == "demonstration":
            d = s.scalars(select(Demonstration).where(Demonstration.assignment_id == a.id)).first()
            if d is not None:
                out["record"] = {"content": d.content, "updated_at": _iso(d.updated_at)}
        elif t.kind == "ranking":
            r = s.scalars(select(Ranking).where(Ranking.assignment_id == a.id)).first()
            if r is not None:
                by = dict(zip(r.answer_ids, r.ranks))
                groups: dict[int, list[int]] = defaultdict(list)
                for i in a.order:
                    if i in by:
                        groups[by[i]].append(i)
                out["record"] = {"ranking": [groups[k] for k in sorted(groups)], "none_acceptable": r.none_acceptable,
                                 "comment": r.comment, "updated_at": _iso(r.updated_at)}
        else:
            rs = {x.answer_id: x for x in s.scalars(select(Rating).where(Rating.assignment_id == a.id))}
            if rs:
                out["record"] = {"ratings": [{"answer_id": i, "likert": rs[i].likert, "flags": rs[i].flags,
                                              "comment": rs[i].comment} for i in a.order if i in rs]}
        return out

    def assignment(self, user: dict, assignment_id: int) -> dict:
        with self.store.session() as s:
            return self._view(s, self._assignment(s, user, assignment_id))

    def assignments(self, user: dict, *, project=None, status: str | None = None, of_user: str | None = None,
                    limit: int = 50) -> list[dict]:
        """The labeler's own assignments, newest first (an admin may ask for anyone's with of_user, or all)."""
        with self.store.session() as s:
            q = select(Assignment).join(Task, Assignment.task_id == Task.id).order_by(
                Assignment.updated_at.desc(), Assignment.id.desc()).limit(limit)
            if user["role"] != "admin":
                if of_user is not None and of_user != user["name"]:
                    raise Forbidden("only an admin can see another labeler's work")
                q = q.where(Assignment.user_id == user["id"])
            elif of_user is not None:
                q = q.where(Assignment.user_id == self._user(s, of_user).id)
            if project is not None:
                q = q.where(Task.project_id == self._project(s, project).id)
            if status is not None:
                q = q.where(Assignment.status == status)
            out = []
            for a in s.scalars(q):
                v = self._view(s, a)
                out.append({k: v[k] for k in ("id", "kind", "status", "labeler", "project", "messages", "record",
                                              "updated_at")})
            return out

    # ------------------------------------------------------------------ submissions
    def _open_for_write(self, s, user: dict, assignment_id: int, kind: str | None) -> tuple[Assignment, Task]:
        a = self._assignment(s, user, assignment_id)
        t = s.get(Task, a.task_id)
        if kind is not None and t.kind != kind:
            raise MinichatError(f"assignment {a.id} is a {t.kind} task, not a {kind}")
        return a, t

    def save_draft(self, user: dict, assignment_id: int, draft: dict | None) -> dict:
        """Unfinished work (typed text, a partial ranking): kept so a reload loses nothing."""
        import json

        if draft is not None and (not isinstance(draft, dict) or len(json.dumps(draft)) > 200_000):
            raise MinichatError("draft must be a JSON object of at most 200 kB")

        def go(s):
            a = self._assignment(s, user, assignment_id)
            a.draft = draft
            a.updated_at = utcnow()
            return {"id": a.id, "saved_at": _iso(a.updated_at)}

        return self._tx(go)

    def _done(self, a: Assignment) -> None:
        a.status, a.draft, a.skip_reason, a.updated_at = "done", None, None, utcnow()

    def submit_demonstration(self, user: dict, assignment_id: int, content: str) -> dict:
        if not isinstance(content, str) or not content.strip():
            raise MinichatError("the demonstration is empty; write the ideal answer, or skip")

        def go(s):
            a, _ = self._open_for_write(s, user, assignment_id, "demonstration")
            d = s.scalars(select(Demonstration).where(Demonstration.assignment_id == a.id)).first()
            if d is None:
                d = Demonstration(assignment_id=a.id, content=content)
                s.add(d)
            else:
                d.content, d.updated_at = content, utcnow()
            self._done(a)
            s.flush()
            return a.id

        return self.assignment(user, self._tx(go))

    def submit_ranking(self, user: dict, assignment_id: int, ranking=None, *, none_acceptable: bool = False,
                       comment: str | None = None) -> dict:
        """ranking: groups of answer ids, best first (ties share a group). With none_acceptable the ranking may
        be left out (then the record says only that)."""

        def go(s):
            a, t = self._open_for_write(s, user, assignment_id, "ranking")
            by_pos = list(s.scalars(select(Answer.id).where(Answer.task_id == t.id).order_by(Answer.position)))
            if ranking is None or ranking == []:
                if not none_acceptable:
                    raise MinichatError("ranking: order the answers best to worst, mark none acceptable, or skip")
                ranks: list[int] = []
            else:
                ranks = ranks_from_groups(ranking, list(a.order))
                place = dict(zip(a.order, ranks))
                ranks = [place[i] for i in by_pos]
            r = s.scalars(select(Ranking).where(Ranking.assignment_id == a.id)).first()
            if r is None:
                r = Ranking(assignment_id=a.id, answer_ids=by_pos, ranks=ranks)
                s.add(r)
            r.answer_ids, r.ranks, r.none_acceptable, r.comment, r.updated_at = \
                by_pos, ranks, bool(none_acceptable), comment, utcnow()
            self._done(a)
            s.flush()
            return a.id

        return self.assignment(user, self._tx(go))

    def submit_rating(self, user: dict, assignment_id: int, ratings: list[dict]) -> dict:
        """ratings: one {answer_id, likert 1..7, flags: {name: bool}, comment?} per shown answer."""
        if not isinstance(ratings, list):
            raise MinichatError("ratings must be a list of {answer_id, likert, flags} objects")
        clean = []
        for i, r in enumerate(ratings):
            if not isinstance(r, dict):
                raise MinichatError(f"ratings[{i}] must be an object")
            lk = r.get("likert")
            if not isinstance(lk, int) or isinstance(lk, bool) or not 1 <= lk <= 7:
                raise MinichatError(f"ratings[{i}].likert must be an integer 1..7 (1 = terrible, 7 = excellent), "
                                    f"got {lk!r}")
            flags = r.get("flags") or {}
            if not isinstance(flags, dict):
                raise MinichatError(f"ratings[{i}].flags must be an object of yes/no answers")
            bad = [k for k in flags if k not in FLAGS]
            if bad:
                raise MinichatError(f"ratings[{i}].flags: unknown {bad[0]!r}; the metadata asked is: {', '.join(FLAGS)}")
            if not all(isinstance(v, bool) for v in flags.values()):
                raise MinichatError(f"ratings[{i}].flags values must be true or false")
            clean.append({"answer_id": r.get("answer_id"), "likert": lk,
                          "flags": {k: bool(flags.get(k, False)) for k in FLAGS}, "comment": r.get("comment")})

        def go(s):
            a, _ = self._open_for_write(s, user, assignment_id, "rating")
            shown = list(a.order)
            got = [c["answer_id"] for c in clean]
            if sorted(got, key=str) != sorted(shown, key=str) or len(set(got)) != len(got):
                raise MinichatError(f"rate every shown answer exactly once (answers {', '.join(map(str, shown))}; "
                                    f"got {', '.join(map(str, got)) or 'none'})")
            have = {x.answer_id: x for x in s.scalars(select(Rating).where(Rating.assignment_id == a.id))}
            for c in clean:
                x = have.get(c["answer_id"])
                if x is None:
                    x = Rating(assignment_id=a.id, answer_id=c["answer_id"], likert=c["likert"], flags=c["flags"])
                    s.add(x)
                x.likert, x.flags, x.comment, x.updated_at = c["likert"], c["flags"], c["comment"], utcnow()
            self._done(a)
            s.flush()
            return a.id

        return self.assignment(user, self._tx(go))

    def skip(self, user: dict, assignment_id: int, reason: str | None = None) -> dict:
        def go(s):
            a = self._assignment(s, user, assignment_id)
            for model in (Demonstration, Ranking, Rating):  # a skipped task has no record
                s.query(model).filter(model.assignment_id == a.id).delete(synchronize_session=False)
            a.status, a.skip_reason, a.draft, a.updated_at = "skipped", reason or None, None, utcnow()
            return a.id

        return self.assignment(user, self._tx(go))

    # ------------------------------------------------------------------ dashboard
    def agreement(self, project=None, *, include_held_out: bool = True) -> dict:
        """Pairwise agreement on comparisons between labelers who ranked the same task: overall, per labeler
        (against everyone else) and per pair of labelers; and agreement of the Likert ratings of answers that
        several labelers rated (`ratings`, see rating_agreement)."""
        with self.store.session() as s:
            rq = (select(Rating.answer_id, Rating.likert, Rating.flags, User.held_out)
                  .join(Assignment, Rating.assignment_id == Assignment.id).join(User, Assignment.user_id == User.id)
                  .join(Task, Assignment.task_id == Task.id).where(Assignment.status == "done"))
            if project is not None:
                rq = rq.where(Task.project_id == self._project(s, project).id)
            by_answer: dict[int, list[int]] = defaultdict(list)
            by_flag: dict[str, dict[int, list[int]]] = {f: defaultdict(list) for f in FLAGS}
            for answer_id, likert, flags, held_out in s.execute(rq):
                if include_held_out or not held_out:
                    by_answer[answer_id].append(int(likert))
                    for f in FLAGS:
                        by_flag[f][answer_id].append(int(bool((flags or {}).get(f, False))))
            q = (select(Ranking, Assignment, User, Task).join(Assignment, Ranking.assignment_id == Assignment.id)
                 .join(User, Assignment.user_id == User.id).join(Task, Assignment.task_id == Task.id))
            if project is not None:
                q = q.where(Task.project_id == self._project(s, project).id)
            by_task: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
            for r, a, u, t in s.execute(q):
                if r.ranks and (include_held_out or not u.held_out):
                    by_task[t.id].append((u.name, list(r.ranks)))
        total, n = 0.0, 0
        per_user: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        per_pair: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        tasks = 0
        for rows in by_task.values():
            if len(rows) < 2:
                continue
            tasks += 1
            for (ua, ra), (ub, rb) in combinations(rows, 2):
                sc, k = pair_agreement(ra, rb)
                total, n = total + sc, n + k
                for u in (ua, ub):
                    per_user[u][0] += sc
                    per_user[u][1] += k
                key = " & ".join(sorted((ua, ub)))
                per_pair[key][0] += sc
                per_pair[key][1] += k
        rate = lambda v: (v[0] / v[1]) if v[1] else None  # noqa: E731
        return {"agreement": (total / n) if n else None, "pairs": n, "tasks": tasks,
                "ratings": rating_agreement(list(by_answer.values())),
                # yes/no metadata: on 0/1 values the interval alpha is the nominal one, "exact" the agreement
                "flags": {f: {k: r[k] for k in ("pairs", "exact", "alpha")} for f, units in by_flag.items()
                          if (r := rating_agreement(list(units.values())))["pairs"]},
                "per_labeler": {u: {"agreement": rate(v), "pairs": int(v[1])} for u, v in sorted(per_user.items())},
                "per_pair": {k: {"agreement": rate(v), "pairs": int(v[1])} for k, v in sorted(per_pair.items())}}

    def dashboard(self, user: dict, project=None) -> dict:
        """Progress per project and per labeler, with agreement. A labeler sees only their own row."""
        with self.store.session() as s:
            projects = [self._project(s, project)] if project is not None else list(
                s.scalars(select(Project).order_by(Project.id)))
            users = {u.id: u for u in s.scalars(select(User))}
            out_projects = []
            labelers: dict[str, dict] = {}
            for p in projects:
                cfg = self._config(p)
                tasks = dict(s.execute(select(Task.kind, func.count()).where(Task.project_id == p.id)
                                       .group_by(Task.kind)).all())
                prompts = s.scalar(select(func.count()).select_from(Prompt).where(Prompt.project_id == p.id)) or 0
                ready = s.scalar(select(func.count(func.distinct(Answer.task_id))).join(Task, Answer.task_id == Task.id)
                                 .where(Task.project_id == p.id)) or 0
                status: dict[str, int] = defaultdict(int)
                done_tasks: dict[int, int] = defaultdict(int)
                comparisons = 0
                rows = s.execute(select(Assignment, Task).join(Task, Assignment.task_id == Task.id)
                                 .where(Task.project_id == p.id)).all()
                rank_sizes = {r.assignment_id: len(r.ranks) for r in s.scalars(
                    select(Ranking).join(Assignment, Ranking.assignment_id == Assignment.id)
                    .join(Task, Assignment.task_id == Task.id).where(Task.project_id == p.id))}
                for a, t in rows:
                    status[a.status] += 1
                    if a.status == "done":
                        done_tasks[t.id] += 1
                        comparisons += math.comb(rank_sizes.get(a.id, 0), 2)
                    u = users[a.user_id]
                    row = labelers.setdefault(u.name, {"labeler": u.name, "role": u.role, "held_out": u.held_out,
                                                       "done": defaultdict(int), "skipped": 0, "open": 0,
                                                       "last_active": None})
                    if a.status == "done":
                        row["done"][t.kind] += 1
                    elif a.status == "skipped":
                        row["skipped"] += 1
                    else:
                        row["open"] += 1
                    last = _iso(a.updated_at)
                    if row["last_active"] is None or last > row["last_active"]:
                        row["last_active"] = last
                n_tasks = sum(tasks.values())
                complete = sum(1 for v in done_tasks.values() if v >= cfg.overlap)
                out_projects.append({
                    "id": p.id, "name": p.name, "prompts": prompts, "tasks": tasks, "tasks_ready": (
                        tasks.get("demonstration", 0) + ready), "overlap": cfg.overlap, "k": cfg.k,
                    "assignments": dict(status), "tasks_complete": complete,
                    "progress": complete / n_tasks if n_tasks else 0.0, "comparisons": comparisons})
        agreement = self.agreement(project)
        for name, row in labelers.items():
            row["done"] = dict(row["done"])
            row["agreement"] = agreement["per_labeler"].get(name, {}).get("agreement")
        lab_rows = sorted(labelers.values(), key=lambda r: r["labeler"])
        if user["role"] != "admin":
            lab_rows = [r for r in lab_rows if r["labeler"] == user["name"]]
            agreement = {k: agreement[k] for k in ("agreement", "pairs", "tasks", "ratings", "flags")}
        return {"projects": out_projects, "labelers": lab_rows, "agreement": agreement}

    # ------------------------------------------------------------------ export
    def export_rows(self, *, project=None, labelers: Iterable[str] | None = None, held_out: str = "exclude",
                    since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict[str, list[dict]]:
        """The training files' rows: sft (messages), rankings (K-wise answers + ranks), pairs (chosen/rejected),
        ratings. held_out: exclude (training: the default) | include | only (evaluation)."""
        if held_out not in ("exclude", "include", "only"):
            raise MinichatError(f"held_out must be exclude, include or only, got {held_out!r}")
        labelers = list(labelers or [])
        out: dict[str, list[dict]] = {"sft": [], "rankings": [], "pairs": [], "ratings": []}
        with self.store.session() as s:
            for name in labelers:
                self._user(s, name)  # a typo in a filter should not silently export nothing
            pid = self._project(s, project).id if project is not None else None

            def base(model):
                q = (select(model, Assignment, Task, Prompt, User, Project)
                     .join(Assignment, model.assignment_id == Assignment.id)
                     .join(Task, Assignment.task_id == Task.id).join(Prompt, Task.prompt_id == Prompt.id)
                     .join(User, Assignment.user_id == User.id).join(Project, Task.project_id == Project.id)
                     .where(Assignment.status == "done").order_by(model.id))
                if pid is not None:
                    q = q.where(Task.project_id == pid)
                if labelers:
                    q = q.where(User.name.in_(labelers))
                if held_out == "exclude":
                    q = q.where(User.held_out.is_(False))
                elif held_out == "only":
                    q = q.where(User.held_out.is_(True))
                if since is not None:
                    q = q.where(model.updated_at >= since)
                if until is not None:
                    q = q.where(model.updated_at < until)
                return q

            def meta(rec, a, t, pr, u, p):
                return {"project": p.name, "prompt_id": pr.id, "task_id": t.id, "assignment_id": a.id,
                        "labeler": u.name, "held_out": u.held_out, "category": pr.category,
                        "prompt_meta": dict(pr.meta or {}), "submitted_at": _iso(rec.updated_at)}

            for d, a, t, pr, u, p in s.execute(base(Demonstration)):
                out["sft"].append({"messages": list(pr.messages) + [{"role": "assistant", "content": d.content}],
                                   "meta": meta(d, a, t, pr, u, p)})
            for r, a, t, pr, u, p in s.execute(base(Ranking)):
                if not r.ranks:
                    continue  # "none acceptable" without an order: nothing to compare
                answers = {x.id: x for x in s.scalars(select(Answer).where(Answer.task_id == t.id))}
                items = sorted(zip(r.answer_ids, r.ranks), key=lambda x: (x[1], answers[x[0]].position))
                m = meta(r, a, t, pr, u, p)
                m.update(none_acceptable=r.none_acceptable, comment=r.comment,
                         answer_ids=[i for i, _ in items], models=[answers[i].model for i, _ in items])
                out["rankings"].append({"prompt": list(pr.messages), "answers": [answers[i].content for i, _ in items],
                                        "ranks": [k for _, k in items], "meta": m})
                ranks = [k for _, k in items]
                for w, l in strict_pairs(ranks):
                    pm = dict(m, chosen_id=items[w][0], rejected_id=items[l][0],
                              chosen_model=answers[items[w][0]].model, rejected_model=answers[items[l][0]].model)
                    for key in ("answer_ids", "models"):
                        pm.pop(key)
                    out["pairs"].append({"prompt": list(pr.messages),
                                         "chosen": [{"role": "assistant", "content": answers[items[w][0]].content}],
                                         "rejected": [{"role": "assistant", "content": answers[items[l][0]].content}],
                                         "meta": pm})
            for x, a, t, pr, u, p in s.execute(base(Rating)):
                ans = s.get(Answer, x.answer_id)
                out["ratings"].append({"prompt": list(pr.messages), "answer": ans.content, "model": ans.model,
                                       "likert": x.likert, "flags": dict(x.flags or {}), "comment": x.comment,
                                       "meta": meta(x, a, t, pr, u, p)})
        return out


def export_counts(rows: dict[str, list[dict]]) -> dict[str, int]:
    """prompts (distinct, over every file), comparisons = Σ C(K,2) over rankings (InstructGPT's count), pairs
    (strictly ordered pairs written; ties give none), and rows per file."""
    prompts = {r["meta"]["prompt_id"] for k in ("sft", "rankings", "ratings") for r in rows[k]}
    return {"prompts": len(prompts), "demonstrations": len(rows["sft"]), "rankings": len(rows["rankings"]),
            "comparisons": sum(math.comb(len(r["answers"]), 2) for r in rows["rankings"]),
            "pairs": len(rows["pairs"]), "ratings": len(rows["ratings"])}


__all__ = ["CATEGORIES", "FLAGS", "Forbidden", "Labeling", "ProjectConfig", "Unauthorized", "ensure_schema",
           "export_counts", "pair_agreement", "ranks_from_groups", "rating_agreement", "strict_pairs"]
