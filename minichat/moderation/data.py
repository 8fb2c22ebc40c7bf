"""Reading the development data (from ../shared at training/bench time only) and the fixed held-out split.

Label mapping to the 13 categories (a missing category means "unknown", left out of that head's training):
  davidson  hate (0)      -> hate 1, harassment 1
            offensive (1) -> harassment 1, hate 0
            neither (2)   -> every category 0
  hatecheck hateful       -> hate 1; threats (threat_*) also hate/threatening, violence, harassment/threatening 1
            non-hateful   -> hate 0, hate/threatening 0; abuse of individuals or non-protected groups
                             (target_indiv_nh, target_group_nh) -> harassment 1 (OpenAI would flag them);
                             all other non-hateful cases (counter-speech, negation, neutral identity mentions,
                             homonyms, reclaimed slurs, profanity, abuse of objects) -> every category 0
Binary "any category" label: davidson hate or offensive; hatecheck hateful, or abusive toward a person/group.

Held-out split: 20% of each source, chosen by a hash: davidson by the normalised text (duplicates and retweets
fall on the same side), hatecheck by template id (so no near-identical case of a held-out template is trained on).
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from minichat.errors import MinichatError
from minichat.moderation.categories import CATEGORIES

HOLDOUT_PERCENT = 20
# hand-written labelled texts (this project's own): `<category>\t<text>` lines in *_unsafe.tsv,
# `<topic>\t<text>` in *_safe.tsv
WRITTEN_DIR = Path(__file__).resolve().parent / "written"
_ABUSIVE_NH = {"target_indiv_nh", "target_group_nh"}


@dataclass
class Example:
    text: str
    labels: dict[str, int]  # known categories only
    any: int  # binary "any category" label
    source: str
    group: str  # the unit the split hashes
    functionality: str = ""


def default_data_dir() -> Path | None:
    """$MINICHAT_SHARED/data/moderation, or ../shared/data/moderation from the current or the package folder."""
    cands = []
    if os.environ.get("MINICHAT_SHARED"):
        cands.append(Path(os.environ["MINICHAT_SHARED"]) / "data" / "moderation")
    cands.append(Path.cwd().parent / "shared" / "data" / "moderation")
    cands.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "moderation")
    for c in cands:
        if (c / "davidson_labeled_data.csv").is_file():
            return c
    return None


def is_holdout(group: str) -> bool:
    h = int(hashlib.sha1(group.encode("utf-8")).hexdigest()[:8], 16)
    return h % 100 < HOLDOUT_PERCENT


def load_davidson(path: Path) -> list[Example]:
    from minichat.moderation.learned import prepare

    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            cls = int(row["class"])
            text = row["tweet"]
            if cls == 2:
                labels = {c: 0 for c in CATEGORIES}
            elif cls == 0:
                labels = {"hate": 1, "harassment": 1}
            else:
                labels = {"harassment": 1, "hate": 0}
            out.append(Example(text, labels, int(cls != 2), "davidson", "d:" + prepare(text)))
    return out


def load_hatecheck(path: Path) -> list[Example]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            func = row["functionality"]
            text = row["test_case"].strip()
            if row["label_gold"] == "hateful":
                labels = {"hate": 1}
                if func.startswith("threat_"):
                    labels.update({"hate/threatening": 1, "violence": 1, "harassment/threatening": 1})
                else:
                    labels["hate/threatening"] = 0
                any_ = 1
            elif func in _ABUSIVE_NH:
                labels = {"hate": 0, "hate/threatening": 0, "harassment": 1}
                any_ = 1
            else:
                labels = {c: 0 for c in CATEGORIES}
                any_ = 0
            out.append(Example(text, labels, any_, "hatecheck", "h:" + row["templ_id"], func))
    return out


def load_dev(data_dir: str | Path | None = None) -> list[Example]:
    d = Path(data_dir) if data_dir else default_data_dir()
    if d is None or not (d / "davidson_labeled_data.csv").is_file():
        raise MinichatError("moderation development data not found: pass --data-dir pointing at "
                            "shared/data/moderation (davidson_labeled_data.csv, hatecheck_test_suite_cases.csv)")
    return load_davidson(d / "davidson_labeled_data.csv") + load_hatecheck(d / "hatecheck_test_suite_cases.csv")


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(development part, held-out part); the held-out part is never used for training or tuning."""
    dev, held = [], []
    for e in examples:
        (held if is_holdout(e.group) else dev).append(e)
    return dev, held


def load_written(directory: str | Path | None = None) -> list[tuple[str, dict[str, int]]]:
    """The hand-written training texts as (text, labels). A harmful text is labelled 1 for its category and
    that category's parent, and left unknown for the others (an insult may also be hate); a benign one is 0 for
    every category. A bad line is an error naming its file and line, not a silent skip."""
    from minichat.moderation.categories import PARENT

    d = Path(directory) if directory else WRITTEN_DIR
    files = sorted(d.glob("*_unsafe.tsv")) + sorted(d.glob("*_safe.tsv"))
    if not files:
        raise MinichatError(f"no hand-written moderation texts (*_unsafe.tsv, *_safe.tsv) in {d}")
    rows: list[tuple[str, dict[str, int]]] = []
    for f in files:
        harmful = f.name.endswith("_unsafe.tsv")
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            label, sep, text = line.partition("\t")
            label, text = label.strip(), text.strip()
            if not sep or not text:
                raise MinichatError(f"{f}:{n}: expected LABEL<tab>TEXT")
            if not harmful:
                rows.append((text, {c: 0 for c in CATEGORIES}))
                continue
            if label not in CATEGORIES:
                raise MinichatError(f"{f}:{n}: unknown category {label!r}")
            labels = {label: 1}
            if label in PARENT:
                labels[PARENT[label]] = 1
            rows.append((text, labels))
    return rows
