"""`minichat label`: users, projects, import, sampling, stats, export from the command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.label.conftest import write_jsonl

from minichat.cli import main as minichat


def test_cli_end_to_end(tiny_lm, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    guide = tmp_path / "guide.md"
    guide.write_text("# Rules\nBe honest.", encoding="utf-8")
    assert minichat(["label", "user", "add", "boss", "--role", "admin", "--store", url]) == 0
    out = capsys.readouterr().out
    token = re.search(r"token: (\S+)", out).group(1)
    assert minichat(["label", "user", "add", "eve", "--password", "eve-password", "--held-out", "--store", url]) == 0
    assert minichat(["label", "project", "create", "cli", "--guidelines", str(guide), "--store", url,
                     "--tasks", "demonstration,ranking", "--models", f"tiny={tiny_lm}", "--k", "4", "--overlap", "2",
                     "--max_tokens", "6"]) == 0
    assert "created project 'cli'" in capsys.readouterr().out
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me about red", "category": "open qa"},
                                                  {"prompt": "tell me about blue"}])
    assert minichat(["label", "import", "cli", str(prompts), "--sample", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "imported 2 prompts" in out and "sampled 8 answers for 2 tasks" in out

    from minichat.label.service import Labeling
    from minichat.serve.store import Store

    store = Store(url)
    lab = Labeling(store)
    assert lab.project("cli")["guidelines"] == "# Rules\nBe honest."
    boss = lab.authenticate(lab.login("boss", token)[0])
    eve = lab.authenticate(lab.login("eve", "eve-password")[0])
    for u in (boss, eve):
        a = lab.next_assignment(u, "cli", "ranking")
        lab.submit_ranking(u, a["id"], [[x["id"]] for x in a["answers"]])
    store.close()

    assert minichat(["label", "stats", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "project cli: 2 prompts" in out and "eve" in out and "held-out" in out
    assert "inter-labeler agreement on comparisons" in out
    assert minichat(["label", "stats", "--json", "--store", url]) == 0
    assert json.loads(capsys.readouterr().out)["agreement"]["pairs"] > 0
    assert minichat(["label", "export", "--out", str(tmp_path / "ex"), "--store", url]) == 0
    assert "1 rankings = 6 comparisons" in capsys.readouterr().out
    assert minichat(["label", "export", "--out", str(tmp_path / "ev"), "--held-out", "include", "--labeler", "eve",
                     "--since", "2000-01-01", "--store", url]) == 0
    assert "1 rankings" in capsys.readouterr().out
    assert minichat(["label", "user", "set", "boss", "--held-out", "--store", url]) == 0
    assert minichat(["label", "user", "list", "--store", url]) == 0
    assert re.search(r"boss\s+admin\s+held-out", capsys.readouterr().out)
    assert minichat(["label", "project", "update", "cli", "--overlap", "3", "--store", url]) == 0
    assert '"overlap": 3' in capsys.readouterr().out


def test_cli_errors_are_clear_and_without_traceback(tmp_path):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n', encoding="utf-8")
    assert minichat(["label", "project", "create", "p", "--tasks", "demonstration", "--store", url]) == 0
    r = subprocess.run([sys.executable, "-m", "minichat.cli", "label", "import", "p", str(bad), "--store", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.jsonl:2: the prompt must be a string or a non-empty list" in r.stderr
    assert minichat(["label", "project", "create", "p", "--store", url]) == 2  # exists
    assert minichat(["label", "project", "create", "q", "--k", "12", "--store", url]) == 2
    assert minichat(["label", "export", "--out", str(tmp_path / "x"), "--project", "nope", "--store", url]) == 2


def test_stats_print_rating_agreement(capsys):
    from minichat.label.cli import _print_stats

    ratings = {"answers": 3, "pairs": 4, "exact": 0.25, "within_one": 0.5, "mean_abs_diff": 1.25, "alpha": 0.8333}
    flags = {"hallucination": {"pairs": 4, "exact": 0.75, "alpha": 0.5333}, "harmful_advice": {"pairs": 4, "exact": 1.0,
                                                                                              "alpha": None}}
    _print_stats({"projects": [], "labelers": [], "agreement": {"agreement": None, "pairs": 0, "tasks": 0,
                                                                "ratings": ratings, "flags": flags}})
    out = capsys.readouterr().out
    assert "metadata flags, agreement (alpha): hallucination 75% (0.53), harmful_advice 100% (-)" in out
    assert "25.0% equal, 50.0% within one point, mean difference 1.25, Krippendorff's alpha 0.83" in out
    assert "(4 pairs over 3 answers)" in out
