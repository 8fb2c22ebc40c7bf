"""The labeling page in a real browser (Playwright + Debian's headless Chromium), served by `minichat serve`:
a labeler logs in, writes a demonstration, ranks four answers sampled by the engine by keyboard, reloads, the
work is there, and the export contains it."""
from __future__ import annotations


import pytest
from tests.label.conftest import write_jsonl
from tests.live import LiveServer

from tests.live import browser  # noqa: F401 (the fixture)
from tests.live import needs_browser

pytestmark = needs_browser


@pytest.fixture
def served(tiny_lm, tmp_path):
    from minichat.label.importer import read_prompts
    from minichat.label.sampling import sample_project
    from minichat.label.service import ProjectConfig
    from minichat.serve.app import create_app
    from minichat.serve.config import EngineSettings, ServeConfig
    from minichat.serve.models import ModelRegistry
    from minichat.serve.store import Store

    cfg = ServeConfig(models=[f"tiny={tiny_lm}"], store_url=f"sqlite:///{tmp_path / 's.db'}",
                      engine=EngineSettings(device="cpu", weights="fp32", max_batch=4), moderation=False)
    store = Store(cfg.store_url)
    app = create_app(cfg, ModelRegistry.load(cfg.models, cfg.engine), store, None)
    lab = app.state.labeling
    lab.create_project("web", ProjectConfig(tasks=["demonstration", "ranking"], models=[f"tiny={tiny_lm}"], k=4,
                                            max_tokens=12, seed=1),
                       "## Guidelines\n\nPrefer **true**, helpful and harmless answers.")
    lab.import_prompts("web", read_prompts(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Write a haiku about the sea.", "category": "generation"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "tell me about red"}], "category": "chat"}])))
    assert sample_project(lab, "web", weights="fp32")["answers"] == 8  # K = 4 answers per ranking task
    lab.add_user("ann", secret="ann-password")
    srv = LiveServer(app).start()
    srv.lab = lab
    yield srv
    srv.stop()
    store.close()


def _open(browser, url: str):
    """A fresh page on the labeling app, and the list its script errors go to."""
    page = browser.new_context().new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/label/")
    return page, errors


def _log_in(page, name: str, secret: str) -> None:
    page.fill("#login-name", name)
    page.fill("#login-secret", secret)
    page.click("#login-submit")


def test_demonstrate_rank_by_keyboard_reload_export(browser, served, tmp_path):
    page, errors = _open(browser, served.url)
    _log_in(page, "ann", "wrong-password")
    page.wait_for_selector("#login-error:text('wrong name')")
    _log_in(page, "ann", "ann-password")
    page.wait_for_selector("#conversation .turn.user")
    assert "Prefer true" in page.inner_text("#guidelines") and page.inner_text("#guidelines strong") == "true"
    assert page.inner_text("#category") == "generation"

    # a demonstration: typed text is saved as a draft and survives a reload
    page.fill("#demo-text", "Waves fold on the sand")
    page.wait_for_selector("#save-status:text('Saved')")
    page.reload()
    page.wait_for_selector("#conversation .turn.user")
    assert page.input_value("#demo-text") == "Waves fold on the sand"
    page.click("#demo-text")
    page.keyboard.press("End")
    page.keyboard.type(",\nthe gull laughs at noon.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#save-status:text('Submitted')")
    # the next demonstration is the multi-turn one: reply at the last turn
    page.wait_for_function("document.querySelectorAll('#conversation .turn').length === 3")

    # rank four answers by keyboard: 2 best, 4 tied with it, then 1, then 3
    page.keyboard.press("Alt+2")
    page.wait_for_function("document.querySelectorAll('#rank-answers .answer').length === 4")
    page.locator("body").click(position={"x": 5, "y": 5})  # focus off any input
    for key in ("2", "=", "4", "1"):
        page.keyboard.press(key)
    page.wait_for_selector("#ranking-line:text('2 = 4  >  1')")
    page.wait_for_selector("#save-status:text('Saved')")
    page.reload()  # a partial ranking is kept too
    page.wait_for_selector("#ranking-line:text('2 = 4  >  1')")
    page.keyboard.press("3")
    page.keyboard.press("Enter")
    page.wait_for_selector("#save-status:text('Submitted')")

    # reload: the submitted work is listed and opens with what was done
    page.reload()
    page.wait_for_selector("#history li.done.ranking")
    page.wait_for_selector("#history li.done.demonstration")
    assert "Waves fold on the sand" in page.inner_text("#history li.done.demonstration")
    page.click("#history li.done.ranking")
    page.wait_for_selector("#ranking-line:text('2 = 4  >  1  >  3')")
    page.click("#history li.done.demonstration")
    page.wait_for_function("document.querySelector('#demo-text').value.includes('gull laughs')")
    page.context.close()
    assert errors == [], errors

    # the export has both
    from minichat.label.export import export

    counts = export(served.lab, tmp_path / "out")
    assert counts["demonstrations"] == 1 and counts["rankings"] == 1 and counts["comparisons"] == 6
    import json

    sft = json.loads((tmp_path / "out" / "sft.jsonl").read_text())
    assert sft["messages"][-1] == {"role": "assistant", "content": "Waves fold on the sand,\nthe gull laughs at noon."}
    rk = json.loads((tmp_path / "out" / "rankings.jsonl").read_text())
    assert rk["ranks"] == [0, 0, 1, 2] and rk["meta"]["models"] == ["tiny"] * 4
    pairs = (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 5  # 6 pairs but one tie


def test_dashboard_shows_agreement_on_ratings_and_flags(browser, served, tmp_path):
    """Two labelers rate the same answers (through the service); the page's dashboard reports their agreement."""
    from minichat.label.importer import read_prompts
    from minichat.label.service import ProjectConfig
    from tests.label.conftest import login

    lab = served.lab
    lab.create_project("rated", ProjectConfig(tasks=["rating"], models=[], k=4, overlap=2, rate_answers=2))
    lab.import_prompts("rated", read_prompts(write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Name a colour.", "answers": ["red", "the sea"]}])))
    for name, likert, flag in (("bo", {"red": 6, "the sea": 2}, set()), ("cy", {"red": 6, "the sea": 1}, {"the sea"})):
        u = login(lab, name)
        a = lab.next_assignment(u, "rated", "rating")
        lab.submit_rating(u, a["id"], [{"answer_id": x["id"], "likert": likert[x["content"]],
                                        "flags": {"hallucination": x["content"] in flag}} for x in a["answers"]])
    page, errors = _open(browser, served.url)
    _log_in(page, "ann", "ann-password")
    page.wait_for_selector("#conversation .turn.user")  # logged in, her first task shown
    page.click("#dashboard-toggle")
    page.wait_for_selector("#rating-agreement")
    text = page.inner_text("#rating-agreement")
    assert "50.0% equal" in text and "100.0% within one point" in text and "(2 pairs of ratings)" in text
    assert "hallucination 50.0%" in page.inner_text("#flag-agreement")
    page.context.close()
    assert not errors
