"""The web chat in a real browser: Playwright driving headless Chromium (Debian's `chromium` package)."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.live import browser  # noqa: F401 (the fixture)
from tests.live import needs_browser

pytestmark = needs_browser


@pytest.fixture
def page(browser, live):
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(live.url + "/")
    pg.wait_for_selector("#model-select option", state="attached")
    yield pg
    ctx.close()
    assert errors == [], errors  # no JavaScript errors on the page


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page):
    page.wait_for_selector("#send:not([hidden])")


def test_chat_regenerate_compare_edit_thumbs_reload(page, live, model_files):
    page.select_option("#model-select", "script")
    page.click("#settings-toggle")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    send(page, "Why is the sky blue?")
    page.wait_for_function("document.querySelector('.msg.assistant .bubble') && "
                           "document.querySelector('.msg.assistant .bubble').innerText.includes('sunlight.')")
    wait_idle(page)
    assert page.inner_text(".msg.user .bubble") == "Why is the sky blue?"
    assert page.inner_text(".msg.assistant .bubble").strip() == model_files.script_text
    assert page.inner_text("#conv-list .conv .title") == "Why is the sky blue?"

    # regenerate -> a second version, then say it was better
    page.click(".msg.assistant .regenerate")
    page.wait_for_selector(".msg.assistant .sib-label:text('2/2')")
    wait_idle(page)
    page.click(".compare .better")
    page.wait_for_selector(".compare:text('noted as better')")
    assert live.store.counts()["comparisons"] >= 1

    # thumbs up on the shown answer
    page.click(".msg.assistant .thumb-up")
    page.wait_for_selector(".msg.assistant .thumb-up.on")
    page.fill(".comment-box input", "clear and short")
    page.press(".comment-box input", "Enter")
    page.wait_for_selector(".meta-note:text('Thanks for the feedback.')")
    aid = page.get_attribute(".msg.assistant", "data-id")
    conv_id = page.evaluate("location.hash.slice(1)")
    fb = {m["id"]: m for m in live.store.get_conversation(conv_id)["messages"]}[aid]["feedback"]
    assert fb == {"rating": 1, "comment": "clear and short"}

    # edit the question and resend: the edited version becomes a sibling of the original
    page.click(".msg.user .edit")
    page.fill(".edit-box textarea", "Edited: why is the sea blue?")
    page.click(".edit-box .save")
    page.wait_for_selector(".msg.user .sib-label:text('2/2')")
    wait_idle(page)
    assert page.inner_text(".msg.user .bubble") == "Edited: why is the sea blue?"
    page.click(".msg.user .prev")  # back to the first version, with its answers
    page.wait_for_selector(".msg.user .sib-label:text('1/2')")
    assert page.inner_text(".msg.user .bubble") == "Why is the sky blue?"

    # reload: the conversation comes back from the store
    page.reload()
    page.wait_for_selector(".msg.user .bubble")
    assert page.inner_text(".msg.user .bubble") == "Why is the sky blue?"
    page.click("#new-chat")
    page.wait_for_selector("#empty")
    page.click("#conv-list .conv")
    page.wait_for_selector(".msg.assistant .bubble")


def test_moderation_is_shown_plainly(page):
    page.select_option("#model-select", "bad")
    send(page, "What is your plan?")
    page.wait_for_selector(".moderation-note")
    wait_idle(page)
    assert "Moderation replaced this reply" in page.inner_text(".moderation-note")
    assert "kill" not in page.inner_text(".msg.assistant .bubble")


def test_stop_button_keeps_partial_reply(page, live):
    c = httpx.post(live.url + "/api/conversations", timeout=10, json={
        "model": "tiny", "settings": {"max_tokens": 1000, "min_tokens": 1000, "temperature": 1}}).json()
    page.goto(f"{live.url}/#{c['id']}")
    page.wait_for_selector("#model-select option", state="attached")
    page.wait_for_function(f"location.hash === '#{c['id']}' && document.querySelector('#max-tokens').value === '1000'")
    # the tiny model writes 220 tokens in well under a second: press Stop from inside the page as soon as the
    # first words show, rather than racing it from the test process
    page.evaluate("""() => {
        const obs = new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant .bubble'), stop = document.getElementById('stop');
            if (b && b.innerText.trim().length > 0 && !stop.hidden) { obs.disconnect(); stop.click(); }
        });
        obs.observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Tell me a long story.")
    page.wait_for_selector(".stopped-note")
    wait_idle(page)
    aid = page.get_attribute(".msg.assistant", "data-id")
    deadline = time.time() + 20
    while time.time() < deadline:
        m = {x["id"]: x for x in live.store.get_conversation(c["id"])["messages"]}[aid]
        if m["finish_reason"] == "stopped":
            break
        time.sleep(0.05)
    assert m["finish_reason"] == "stopped" and len(m["content"]) > 0
    # compare letters and digits only: the browser collapses whitespace runs and Markdown eats punctuation
    def bare(t):
        return "".join(ch for ch in t if ch.isalnum())

    assert bare(page.inner_text(".msg.assistant .bubble")) in bare(m["content"])


def test_markdown_is_rendered_and_html_escaped(page):
    html = page.evaluate("""() => {
        const d = document.createElement('div');
        d.innerHTML = MiniMarkdown.render('# Title\\n**bold** and `x<y`\\n\\n- one\\n- two\\n\\n```python\\nprint(1 < 2)\\n```\\n'
            + '<img src=x onerror="window.pwned=1"> [link](javascript:alert(1)) [ok](https://example.org)');
        document.body.appendChild(d);
        return {h1: d.querySelectorAll('h1').length, strong: d.querySelector('strong').textContent,
                li: d.querySelectorAll('li').length, code: d.querySelector('pre code').textContent,
                lang: d.querySelector('pre code').className, img: d.querySelectorAll('img').length,
                links: [...d.querySelectorAll('a')].map(a => a.href), text: d.innerText};
    }""")
    assert html["h1"] == 1 and html["strong"] == "bold" and html["li"] == 2
    assert html["code"] == "print(1 < 2)" and html["lang"] == "language-python"
    assert html["img"] == 0 and "<img" in html["text"]  # shown as text, never as markup
    assert html["links"] == ["https://example.org/"]
    assert page.evaluate("window.pwned") is None
