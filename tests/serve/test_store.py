"""The store: Alembic migrations, the conversation tree, feedback, and the export to reward-model data."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import inspect

from minichat.errors import MinichatError
from minichat.serve.store import HEAD_REVISION, Base, NotFound, Store


@pytest.fixture
def store(db_url, tmp_path):
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{tmp_path / 'deep' / 'er' / 'store.db'}"  # folders are created on first use
    s = Store(db_url)
    yield s
    s.close()


def test_migrations_create_the_models_schema(store):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert store.revision() == {HEAD_REVISION}
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    names = set(inspect(store.engine).get_table_names())
    assert {"conversations", "messages", "moderation_decisions", "feedback", "comparisons", "responses",
            "alembic_version"} <= names


def test_reopen_is_idempotent_and_keeps_data(db_url):
    url = db_url
    s = Store(url)
    cid = s.create_conversation(title="kept")["id"]
    s.close()
    s2 = Store(url)
    assert s2.get_conversation(cid)["title"] == "kept" and s2.revision() == {HEAD_REVISION}
    s2.close()


def test_a_new_branch_of_migrations_adds_tables(db_url, tmp_path):
    """How the labeling app extends the store: its own revisions, depending on ours, in another folder."""
    versions = tmp_path / "label_versions"
    versions.mkdir()
    (versions / "l001_projects.py").write_text(textwrap.dedent('''
        import sqlalchemy as sa
        from alembic import op
        revision = "l001"
        down_revision = None
        branch_labels = ("label",)
        depends_on = "0001"
        def upgrade():
            op.create_table("label_projects", sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("conversation_id", sa.String(32), sa.ForeignKey("conversations.id")))
        def downgrade():
            op.drop_table("label_projects")
    '''))
    url = db_url
    Store(url).close()  # an existing database at our head
    s = Store(url, version_locations=[str(versions)])
    # alembic records only heads: l001 depends on 0001, so it stands for it; 0002 is a head of its own
    assert s.revision() == {"l001", HEAD_REVISION}
    assert {"label_projects", "conversations"} <= set(inspect(s.engine).get_table_names())
    s.close()


def test_bad_url_is_a_clear_error():
    with pytest.raises(MinichatError, match="store URL"):
        Store("nosuchdialect://x")
    with pytest.raises(MinichatError, match="store URL") as e:  # the message never shows a password
        Store("nosuchdialect://ann:hunter2secret@host/db")
    assert "hunter2secret" not in str(e.value)


def test_strings_longer_than_their_column_are_refused_alike_on_every_backend(store):
    """PostgreSQL fails such a write with a driver error and SQLite keeps the whole string: the store refuses
    it on both, with the field's name, and writes nothing."""
    store.create_conversation(title="t" * 200, model="m")
    with pytest.raises(MinichatError, match=r"conversations.title takes at most 200 characters, got 201"):
        store.create_conversation(title="t" * 201)
    c = store.create_conversation(title="ok")
    with pytest.raises(MinichatError, match=r"messages.model takes at most 200"):
        store.add_message(c["id"], role="user", content="x" * 100_000, model="m" * 201)  # Text has no limit
    assert [x["title"] for x in store.list_conversations()] == ["ok", "t" * 200]
    assert store.get_conversation(c["id"])["messages"] == []


def test_conversation_tree_edit_and_regenerate(store):
    c = store.create_conversation(model="m", system_prompt="Be kind.", settings={"temperature": 0.5})
    u1 = store.add_message(c["id"], role="user", content="What is 2+2?")
    a1 = store.add_message(c["id"], role="assistant", content="4", parent_id=u1["id"], model="m")
    a2 = store.add_message(c["id"], role="assistant", content="four", parent_id=u1["id"], model="m")  # regenerate
    u2 = store.add_message(c["id"], role="user", content="What is 3+3?")  # edit of the first question: new root
    got = store.get_conversation(c["id"])
    assert got["title"] == "What is 2+2?"  # from the first user message
    assert len(got["messages"]) == 4 and got["path"] == [u2["id"]]
    store.update_conversation(c["id"], current_leaf_id=a2["id"])
    assert store.get_conversation(c["id"])["path"] == [u1["id"], a2["id"]]
    assert [m["content"] for m in store.thread(a1["id"])] == ["What is 2+2?", "4"]
    with pytest.raises(NotFound):
        store.add_message(c["id"], role="assistant", content="x", parent_id="nope")
    with pytest.raises(MinichatError):
        store.add_message(c["id"], role="robot", content="x")
    assert store.list_conversations()[0]["id"] == c["id"]
    assert store.list_conversations(owner="someone-else") == []
    store.delete_conversation(c["id"])
    with pytest.raises(NotFound):
        store.get_conversation(c["id"])
    assert store.counts()["messages"] == 0


def _pairs(store):
    c = store.create_conversation(system_prompt="Be kind.")
    u = store.add_message(c["id"], role="user", content="Say hi")
    a = store.add_message(c["id"], role="assistant", content="hi", parent_id=u["id"])
    b = store.add_message(c["id"], role="assistant", content="go away", parent_id=u["id"])
    return c, u, a, b


def test_feedback_and_comparisons(store):
    c, u, a, b = _pairs(store)
    assert store.set_feedback(a["id"], rating=1, comment="nice")["rating"] == 1
    assert store.set_feedback(a["id"], rating=-1)["rating"] == -1  # one row per user: updated, not added
    assert store.counts()["feedback"] == 1
    with pytest.raises(MinichatError):
        store.set_feedback(a["id"], rating=5)
    with pytest.raises(MinichatError):
        store.set_feedback(u["id"], rating=1)  # only answers get thumbs
    other = store.add_message(c["id"], role="user", content="another question")
    other_a = store.add_message(c["id"], role="assistant", content="x", parent_id=other["id"])
    with pytest.raises(MinichatError, match="same message"):
        store.add_comparison(a["id"], other_a["id"])
    with pytest.raises(MinichatError):
        store.add_comparison(a["id"], a["id"])
    store.add_comparison(b["id"], a["id"])
    store.add_comparison(a["id"], b["id"])  # changed their mind: replaces the earlier verdict
    assert store.counts()["comparisons"] == 1


def test_preference_pairs_for_the_reward_trainer(store, tmp_path):
    from minichat.data.chat import load_comparisons

    c, u, a, b = _pairs(store)
    store.add_comparison(a["id"], b["id"])
    c2 = store.create_conversation()
    u2 = store.add_message(c2["id"], role="user", content="Capital of France?")
    good = store.add_message(c2["id"], role="assistant", content="Paris.", parent_id=u2["id"])
    bad = store.add_message(c2["id"], role="assistant", content="Lyon.", parent_id=u2["id"])
    refused = store.add_message(c2["id"], role="assistant", content="I can't help.", parent_id=u2["id"],
                                moderated=True)
    store.set_feedback(good["id"], rating=1)
    store.set_feedback(bad["id"], rating=-1)
    store.set_feedback(refused["id"], rating=-1)
    recs = list(store.preference_pairs())
    assert [r["meta"]["source"] for r in recs] == ["comparison", "thumbs"]
    assert recs[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"}]
    assert recs[0]["chosen"] == [{"role": "assistant", "content": "hi"}]
    assert recs[0]["rejected"] == [{"role": "assistant", "content": "go away"}]
    assert recs[1]["chosen"][0]["content"] == "Paris." and recs[1]["rejected"][0]["content"] == "Lyon."
    assert len(list(store.preference_pairs(include_moderated=True))) == 3
    assert len(list(store.preference_pairs(include_thumbs=False))) == 1

    from minichat.serve.feedback import export

    out = tmp_path / "prefs.jsonl"
    assert export(store, out) == {"comparison": 1, "thumbs": 1}
    comps = load_comparisons(out)  # the reward trainer's own reader accepts the file
    assert [(x.answers, x.ranks) for x in comps] == [(["hi", "go away"], [0, 1]), (["Paris.", "Lyon."], [0, 1])]


def test_feedback_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    s = Store(url)
    _, _, a, b = _pairs(s)
    s.add_comparison(a["id"], b["id"])
    s.close()
    out = tmp_path / "out" / "prefs.jsonl"
    r = subprocess.run([sys.executable, "-m", "minichat.cli", "feedback", "export", "--store", url, "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 1 comparisons" in r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["chosen"][0]["content"] == "hi"
    r = subprocess.run([sys.executable, "-m", "minichat.cli", "feedback", "stats", "--store", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["comparisons"] == 1
    r = subprocess.run([sys.executable, "-m", "minichat.cli", "feedback", "export", "--store",
                        f"sqlite:///{tmp_path / 'missing.db'}", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no store" in r.stderr and "Traceback" not in r.stderr
