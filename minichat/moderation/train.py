"""Train the learned scorer: `python -m minichat.moderation.train [--data-dir DIR] [--out FILE]`.

Trains one logistic-regression head per category on hashed n-grams of: the development part of the shared
moderation data (davidson + hatecheck; the held-out 20% is never read for training), the project's own
generated examples (synth.py) and its hand-written labelled texts (written/, see data.load_written). Writes a
compressed .npz (no pickle) atomically; the default output is the artefact packaged in minichat/moderation/model/.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from minichat.moderation import data as mdata
from minichat.moderation import synth
from minichat.moderation.categories import CATEGORIES
from minichat.moderation.learned import N_FEATURES, featurize

DEFAULT_OUT = Path(__file__).resolve().parent / "model" / "scorer.npz"
# Each hand-written text counts 6 times a generated or tweet one, and the heads trained with balanced classes
# (those no annotated data labels) get their bias lowered by 0.6, a higher threshold. Both were chosen on the
# fresh_dev* sets (bench/moderation), mean recall / false-flag rate:
#   - without the texts 0.77 / 5.1%; with them at weight 1, 3, 6 and 12, unshifted, recall 0.91-0.92 at 7-9%
#     (the rare heads see many more positives), and 6-7 of the 125 safe look-alikes flagged instead of 3;
#   - weight 6 shifted by 0.6: 0.91 / 5.0%, look-alikes 3. Shifting every head instead cost the annotated heads'
#     held-out recall (hatecheck 0.93 -> 0.87) for 0.88 / 4.6%.
# The generated ordinary chat turns (synth_chat) count 3 times: outweighed by the hand-written harmful texts,
# "Did you just text him?" was flagged as harassment again (0.61); at 3 no short test turn is, for 0.91 / 5.1%.
# (Chosen with the first 3,254 texts; with all 8,258, the same settings gave 0.95 / 4.2%.)
WRITTEN_WEIGHT = 6.0
BIAS_SHIFT = 0.6
CHAT_WEIGHT = 3.0


def train(data_dir: str | None, out: Path, keep: int = 30000, c: float = 4.0, seed: int = 0,
          written_dir: str | None = None, written_weight: float = WRITTEN_WEIGHT, bias_shift: float = BIAS_SHIFT,
          chat_weight: float = CHAT_WEIGHT, log=print) -> dict:
    from sklearn.linear_model import LogisticRegression

    t0 = time.time()
    dev, held = mdata.split(mdata.load_dev(data_dir))
    generated = synth.labelled(seed)
    written = mdata.load_written(written_dir) if written_weight > 0 else []
    rows = [(e.text, e.labels) for e in dev] + generated + written
    # hand-written texts can count for more than one generated from templates: they are fewer and more varied
    weight = np.ones(len(rows))
    weight[len(rows) - len(written):] = written_weight
    if chat_weight != 1.0:
        from minichat.moderation import synth_chat

        chat = {t for t, _ in synth_chat.examples(seed)}
        for i in range(len(dev), len(dev) + len(generated)):
            if rows[i][0] in chat:
                weight[i] = chat_weight
    texts = [t for t, _ in rows]
    log(f"training on {len(dev)} development texts + {len(generated)} generated + {len(written)} hand-written "
        f"(weight {written_weight:g}; {len(held)} held out, unused)")
    x = featurize(texts)
    generated_only = {cat for cat in CATEGORIES if not any(e.labels.get(cat) for e in dev)}
    cols, rws, vals, bias, counts = [], [], [], [], {}
    for j, cat in enumerate(CATEGORIES):
        idx = [i for i, (_, lab) in enumerate(rows) if cat in lab]
        y = np.array([rows[i][1][cat] for i in idx])
        counts[cat] = {"n": len(idx), "positive": int(y.sum())}
        if len(set(y.tolist())) < 2:  # no positives (or negatives): a constant head, the rules decide alone
            bias.append(-6.0 if y.size == 0 or y[0] == 0 else 6.0)
            rws.append(np.zeros(0, dtype=np.int32))
            cols.append(np.zeros(0, dtype=np.int16))
            vals.append(np.zeros(0, dtype=np.float16))
            log(f"  {cat:<24} n={len(idx):>6} only one class: constant head")
            continue
        # a category whose positives are all generated (no development text has it) gets balanced classes: its
        # positive share is only how many examples synth.py happens to make, and at that share the rare ones
        # (self-harm, sexual, illicit) were under-predicted on unseen text; annotated categories keep their prior
        counts[cat]["balanced"] = balanced = cat in generated_only
        clf = LogisticRegression(C=c, solver="liblinear", max_iter=200, random_state=seed,
                                 class_weight="balanced" if balanced else None)
        clf.fit(x[idx], y, sample_weight=weight[idx])
        w = clf.coef_[0]
        top = np.argsort(-np.abs(w))[:keep]
        top = top[w[top] != 0]
        rws.append(top.astype(np.int32))
        cols.append(np.full(len(top), j, dtype=np.int16))
        vals.append(w[top].astype(np.float16))
        bias.append(float(clf.intercept_[0]) - (bias_shift if balanced else 0.0))
        log(f"  {cat:<24} n={len(idx):>6} positive={int(y.sum()):>6} kept weights={len(top)}")
    meta = {"categories": list(CATEGORIES), "n_features": N_FEATURES, "C": c, "keep": keep, "seed": seed,
            "trained_on": {"davidson+hatecheck development part": len(dev), "generated": len(generated),
                           "hand-written": len(written)}, "written_weight": written_weight,
            "bias_shift": bias_shift, "chat_weight": chat_weight,
            "holdout_percent": mdata.HOLDOUT_PERCENT, "label_counts": counts,
            "sources": ["t-davidson/hate-speech-and-offensive-language (MIT)",
                        "paul-rottger/hatecheck-data (CC BY 4.0)", "minichat.moderation.synth (this project)",
                        "minichat/moderation/written (this project)"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as f:
        np.savez_compressed(f, rows=np.concatenate(rws), cols=np.concatenate(cols), vals=np.concatenate(vals),
                            bias=np.array(bias, dtype=np.float32),
                            meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the artefact ships in the package
    os.replace(tmp, out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minichat.moderation.train", description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", help="folder with davidson_labeled_data.csv and hatecheck_test_suite_cases.csv "
                                       "(default: ../shared/data/moderation)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="artefact path (default: the packaged one)")
    ap.add_argument("--keep", type=int, default=30000, help="largest weights kept per category")
    ap.add_argument("--C", type=float, default=4.0, help="inverse L2 regularisation strength")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--written-dir", help="folder of hand-written *_unsafe.tsv / *_safe.tsv texts (default: the "
                                          "project's minichat/moderation/written)")
    ap.add_argument("--written-weight", type=float, default=WRITTEN_WEIGHT,
                    help="sample weight of each hand-written text (0 leaves them out)")
    ap.add_argument("--bias-shift", type=float, default=BIAS_SHIFT,
                    help="subtracted from the bias of each head trained with balanced classes (a higher threshold)")
    ap.add_argument("--chat-weight", type=float, default=CHAT_WEIGHT,
                    help="sample weight of each generated ordinary chat turn (synth_chat)")
    a = ap.parse_args(argv)
    train(a.data_dir, a.out, keep=a.keep, c=a.C, seed=a.seed, written_dir=a.written_dir,
          written_weight=a.written_weight, bias_shift=a.bias_shift, chat_weight=a.chat_weight)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
