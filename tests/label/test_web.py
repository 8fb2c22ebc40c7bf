"""The labeling API over HTTP: alone (`minichat label serve`) and mounted in `minichat serve` at /label."""
from __future__ import annotations

import httpx
import pytest
from tests.label.conftest import write_jsonl
from tests.live import LiveServer

from minichat.label.importer import read_prompts
from minichat.label.service import Labeling, ProjectConfig
from minichat.serve.store import Store

ROWS = [{"prompt": f"question {i}", "category": "chat", "answers": [f"q{i} answer {j}" for j in range(4)]}
        for i in range(3)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from minichat.label.web import create_app

    d = tmp_path_factory.mktemp("label_web")
    store = Store(f"sqlite:///{d / 'store.db'}")
    app = create_app(store)
    lab: Labeling = app.state.labeling
    lab.create_project("web", ProjectConfig(tasks=["demonstration", "ranking", "rating"], models=[], overlap=2),
                       "Be **kind**.")
    lab.import_prompts("web", read_prompts(write_jsonl(d / "p.jsonl", ROWS)))
    secrets = {n: lab.add_user(n, role="admin" if n == "boss" else "labeler")[1] for n in ("ann", "bob", "boss")}
    srv = LiveServer(app).start()
    srv.lab, srv.secrets = lab, secrets
    yield srv
    srv.stop()
    store.close()


def client(server, name=None) -> httpx.Client:
    c = httpx.Client(base_url=server.url + "/label/api", timeout=30)
    if name:
        r = c.post("/login", json={"name": name, "secret": server.secrets[name]})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = "Bearer " + r.json()["token"]
    return c


def err(r) -> str:
    return r.json()["error"]["message"]


def test_login_and_auth_errors(server):
    c = client(server)
    r = c.post("/login", json={"name": "ann", "secret": "nope"})
    assert r.status_code == 401 and "wrong name" in err(r)
    r = c.get("/me")
    assert r.status_code == 401 and "log in first" in err(r)
    r = c.get("/me", headers={"Authorization": "Bearer forged"})
    assert r.status_code == 401
    r = c.post("/login", json={"name": "ann"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "secret"
    ann = client(server, "ann")
    me = ann.get("/me").json()
    assert me["user"]["name"] == "ann" and [p["name"] for p in me["projects"]] == ["web"]
    assert me["projects"][0]["guidelines"] == "Be **kind**." and "hallucination" in me["flags"]
    assert ann.post("/logout").status_code == 200 and ann.get("/me").status_code == 401
    page = httpx.get(server.url + "/label/")
    assert page.status_code == 200 and "minichat label" in page.text
    assert "MiniMarkdown" in httpx.get(server.url + "/label/markdown.js").text
    assert httpx.get(server.url + "/label/static/label.js").status_code == 200


def test_label_over_http_with_permissions(server):
    ann, bob, boss = client(server, "ann"), client(server, "bob"), client(server, "boss")
    a = ann.post("/projects/web/next", json={"kind": "demonstration"}).json()["assignment"]
    assert a["kind"] == "demonstration" and a["messages"] == [{"role": "user", "content": "question 0"}]
    assert ann.put(f"/assignments/{a['id']}/draft", json={"draft": {"content": "par"}}).status_code == 200
    assert ann.post("/projects/web/next", json={"kind": "demonstration"}).json()["assignment"]["draft"] == {"content": "par"}
    # bob may neither see nor change ann's work; the admin may
    r = bob.get(f"/assignments/{a['id']}")
    assert r.status_code == 403 and "another labeler" in err(r)
    assert bob.post(f"/assignments/{a['id']}/demonstration", json={"content": "mine"}).status_code == 403
    assert bob.get("/assignments", params={"user_name": "ann"}).status_code == 403
    assert boss.get(f"/assignments/{a['id']}").json()["draft"] == {"content": "par"}
    r = ann.post(f"/assignments/{a['id']}/demonstration", json={"content": "  "})
    assert r.status_code == 400 and "empty" in err(r)
    done = ann.post(f"/assignments/{a['id']}/demonstration", json={"content": "An answer."}).json()
    assert done["status"] == "done" and done["record"]["content"] == "An answer."

    rk = ann.post("/projects/web/next", json={"kind": "ranking"}).json()["assignment"]
    ids = [x["id"] for x in rk["answers"]]
    r = ann.post(f"/assignments/{rk['id']}/ranking", json={"ranking": [[ids[0]], [ids[1]], [ids[1], ids[2], ids[3]]]})
    assert r.status_code == 400 and "appears more than once" in err(r)
    r = ann.post(f"/assignments/{rk['id']}/ranking", json={"ranking": [[ids[0]], [ids[1]]]})
    assert r.status_code == 400 and "not ranked" in err(r)
    r = ann.post(f"/assignments/{rk['id']}/ranking", json={"ranking": [[ids[3]], [ids[0], ids[1]], [ids[2]]]})
    assert r.status_code == 200 and r.json()["record"]["ranking"] == [[ids[3]], [ids[0], ids[1]], [ids[2]]]
    rt = ann.post("/projects/web/next", json={"kind": "rating"}).json()["assignment"]
    r = ann.post(f"/assignments/{rt['id']}/rating", json={"ratings": [{"answer_id": rt["answers"][0]["id"], "likert": 0}]})
    assert r.status_code == 400 and "1..7" in err(r)
    r = ann.post(f"/assignments/{rt['id']}/rating",
                 json={"ratings": [{"answer_id": rt["answers"][0]["id"], "likert": 7, "flags": {"expresses_opinion": True}}]})
    assert r.status_code == 200
    sk = bob.post("/projects/web/next", json={"kind": "ranking"}).json()["assignment"]
    assert sk["task_id"] == rk["task_id"]  # overlap 2
    assert bob.post(f"/assignments/{sk['id']}/skip", json={"reason": "unsure"}).json()["status"] == "skipped"

    hist = ann.get("/assignments", params={"project": "web"}).json()["data"]
    assert {h["kind"] for h in hist} == {"demonstration", "ranking", "rating"}
    assert bob.get("/assignments").json()["data"][0]["status"] == "skipped"
    assert len(boss.get("/assignments").json()["data"]) == 4  # the admin sees everyone's

    dash = bob.get("/dashboard").json()
    assert [r["labeler"] for r in dash["labelers"]] == ["bob"]
    full = boss.get("/dashboard", params={"project": "web"}).json()
    assert {r["labeler"] for r in full["labelers"]} == {"ann", "bob"}
    assert full["projects"][0]["comparisons"] == 6
    assert bob.get("/users").status_code == 403
    assert bob.patch("/users/ann", json={"held_out": True}).status_code == 403
    assert boss.patch("/users/bob", json={"held_out": True}).json()["held_out"] is True
    assert boss.patch("/users/nobody", json={"held_out": True}).status_code == 404
    assert ann.get("/assignments/99999").status_code == 404
    assert ann.post("/projects/nope/next").status_code == 404
    assert ann.post("/projects/web/next", json={"kind": "poem"}).status_code == 400


def test_mounted_in_minichat_serve(tiny_lm, tmp_path):
    """`minichat serve` with a store serves the labeling app at /label next to the chat and the API."""
    from minichat.serve.app import create_app
    from minichat.serve.config import EngineSettings, ServeConfig
    from minichat.serve.models import ModelRegistry

    cfg = ServeConfig(models=[f"tiny={tiny_lm}"], store_url=f"sqlite:///{tmp_path / 's.db'}",
                      engine=EngineSettings(device="cpu", weights="fp32", max_batch=4), moderation=False)
    store = Store(cfg.store_url)
    app = create_app(cfg, ModelRegistry.load(cfg.models, cfg.engine), store, None)
    lab: Labeling = app.state.labeling
    _, secret = lab.add_user("ann")
    srv = LiveServer(app).start()
    try:
        assert httpx.get(srv.url + "/label/").status_code == 200
        r = httpx.post(srv.url + "/label/api/login", json={"name": "ann", "secret": secret})
        assert r.status_code == 200 and r.json()["user"]["name"] == "ann"
        assert httpx.get(srv.url + "/label/api/me").status_code == 401
        assert httpx.get(srv.url + "/api/config").json()["models"] == ["tiny"]  # the chat is still there
    finally:
        srv.stop()
        store.close()
