"""Concurrent labelers on one store (SQLite and PostgreSQL): no record lost, none duplicated, overlap never exceeded."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections import Counter

from tests.label.conftest import login, write_jsonl
from sqlalchemy import func, select

from minichat.label.importer import read_prompts
from minichat.label.models import Assignment, Demonstration, Ranking
from minichat.label.service import Labeling, ProjectConfig
from minichat.serve.store import Store

N_PROMPTS = 8


def _setup(lab, tmp_path, overlap=2):
    lab.create_project("c", ProjectConfig(tasks=["demonstration", "ranking"], models=[], overlap=overlap))
    rows = [{"prompt": f"question {i}", "answers": [f"q{i} a{j}" for j in range(4)]} for i in range(N_PROMPTS)]
    lab.import_prompts("c", read_prompts(write_jsonl(tmp_path / "c.jsonl", rows)))


def _count(store, model, *where):
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_threads_double_submit_and_race_for_tasks(lab, store, tmp_path):
    _setup(lab, tmp_path)
    users = [login(lab, f"u{i}") for i in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(users))

    def work(u):
        try:
            barrier.wait()
            while (a := lab.next_assignment(u, "c", "demonstration")) is not None:
                lab.submit_demonstration(u, a["id"], f"{u['name']} on {a['messages'][-1]['content']}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    # 8 tasks x overlap 2 = 16 records, each task done by exactly two different labelers
    assert _count(store, Demonstration) == 2 * N_PROMPTS
    with store.session() as s:
        per_task = Counter(s.scalars(select(Assignment.task_id).where(Assignment.status == "done")))
    assert sorted(per_task.values()) == [2] * N_PROMPTS

    # eight threads submit rankings to one assignment at once (a labeler double-clicking): one record remains
    u = users[0]
    a = lab.next_assignment(u, "c", "ranking")
    ids = [x["id"] for x in a["answers"]]
    orders = [ids[i:] + ids[:i] for i in range(4)] * 2
    barrier8 = threading.Barrier(len(orders))

    def submit(order):
        try:
            barrier8.wait()
            lab.submit_ranking(u, a["id"], [[i] for i in order])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert _count(store, Ranking, Ranking.assignment_id == a["id"]) == 1
    rec = lab.assignment(u, a["id"])["record"]["ranking"]
    assert [g[0] for g in rec] in orders


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from minichat.serve.store import Store
    from minichat.label.service import Labeling
    url, name, secret, shared, go = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
    lab = Labeling(Store(url))
    me = lab.authenticate(lab.login(name, secret)[0])
    boss = lab.authenticate(lab.login("boss", "boss-password")[0])
    while not go.exists():
        time.sleep(0.01)
    done = 0
    while (a := lab.next_assignment(me, "c", "demonstration")) is not None:
        lab.submit_demonstration(me, a["id"], name + " wrote this")
        done += 1
    ids = [x["id"] for x in lab.assignment(boss, shared)["answers"]]
    k = int(name[1:])
    for rep in range(5):
        order = ids[k:] + ids[:k]
        lab.submit_ranking(boss, shared, [[i] for i in order])
    print(done)
""")


def test_processes_on_one_store(db_url, tmp_path):
    """Three OS processes label the same store at once: on one SQLite file (its file locks, not a Python lock,
    between them) and on one PostgreSQL database (its transactions and unique constraints)."""
    url = db_url
    store = Store(url)
    lab = Labeling(store)
    _setup(lab, tmp_path, overlap=2)
    secrets = {f"p{i}": lab.add_user(f"p{i}")[1] for i in range(3)}
    lab.add_user("boss", role="admin", secret="boss-password")
    shared = lab.next_assignment(lab.authenticate(lab.login("boss", "boss-password")[0]), "c", "ranking")["id"]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, name, secret, str(shared), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, secret in secrets.items()]
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert sum(int(o.strip()) for o, _ in outs) == 2 * N_PROMPTS  # every slot taken once, none twice
    assert _count(store, Demonstration) == 2 * N_PROMPTS
    with store.session() as s:
        per_task = Counter(s.scalars(select(Assignment.task_id).join(Demonstration,
                                                                     Demonstration.assignment_id == Assignment.id)))
    assert sorted(per_task.values()) == [2] * N_PROMPTS
    assert _count(store, Ranking, Ranking.assignment_id == shared) == 1  # 15 racing submits, one record
    store.close()
