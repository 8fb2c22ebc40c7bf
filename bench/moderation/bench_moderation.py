"""Moderation quality and speed benchmark.

    python bench/moderation/bench_moderation.py [--data-dir ../shared/data/moderation] [--out bench/results/moderation.md]

Quality: binary "any category" AUPRC on the held-out 20% of davidson + hatecheck (never used for training or
tuning; see minichat/moderation/data.py), for the full moderator, rules only and the learned scorer only;
false-flag rate on hand-written safe look-alike prompts; recall on hand-written harmful chat prompts.
Speed: rules-only texts/s and full (rules + learned) ms per text, one text per call, on held-out texts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from minichat.moderation import Moderator  # noqa: E402
from minichat.moderation import data as mdata  # noqa: E402
from minichat.moderation.evaluate import binary_metrics  # noqa: E402


def read_lines(name: str) -> list[str]:
    return [l.rstrip("\n") for l in open(HERE / name, encoding="utf-8") if l.strip() and not l.startswith("#")]


def any_scores(mod, texts):
    res = []
    for i in range(0, len(texts), 512):
        res += mod.check_many(texts[i:i + 512])
    return [max(r.category_scores.values()) for r in res], [r.flagged for r in res], res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default=str(HERE.parents[1] / "bench" / "results" / "moderation.md"))
    a = ap.parse_args()
    d = a.data_dir or mdata.default_data_dir()
    if d is None:
        print("skipping: ../shared/data/moderation not found (pass --data-dir)")
        return 0
    _, held = mdata.split(mdata.load_dev(d))
    texts = [e.text for e in held]
    y = [e.any for e in held]
    full = Moderator.load()
    rules = Moderator.load(learned=False)
    out = ["| system | held-out texts | positive | AUPRC (any) | precision | recall | F1 |", "|---|---|---|---|---|---|---|"]
    lines = {}
    for name, mod in (("rules + learned (shipped)", full), ("rules only", rules)):
        s, f, res = any_scores(mod, texts)
        lines[name] = (s, f, res)
    # learned scorer alone: max over its category probabilities
    ls = full.scorer.score(texts)
    lines["learned only"] = ([max(v.values()) for v in ls], [max(v.values()) >= 0.5 for v in ls], None)
    summary = {}
    for name, (s, f, _) in lines.items():
        for src in ("all", "davidson", "hatecheck"):
            idx = [i for i, e in enumerate(held) if src == "all" or e.source == src]
            m = binary_metrics([y[i] for i in idx], [s[i] for i in idx], [f[i] for i in idx])
            summary[(name, src)] = m
            out.append(f"| {name} ({src}) | {m['n']} | {m['positive']} ({m['positive']/m['n']:.0%}) | "
                       f"{m['auprc']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |")
    # balanced view: davidson's positives dominate (83%); subsample positives to the negatives' count
    rng = np.random.default_rng(0)
    s_full = lines["rules + learned (shipped)"][0]
    pos_i = [i for i, v in enumerate(y) if v]
    neg_i = [i for i, v in enumerate(y) if not v]
    sub = neg_i + list(rng.choice(pos_i, size=len(neg_i), replace=False))
    mb = binary_metrics([y[i] for i in sub], [s_full[i] for i in sub], [lines["rules + learned (shipped)"][1][i] for i in sub])
    out.append(f"| rules + learned, balanced 50/50 subsample | {mb['n']} | {mb['positive']} (50%) | {mb['auprc']:.3f} | "
               f"{mb['precision']:.3f} | {mb['recall']:.3f} | {mb['f1']:.3f} |")
    # hatecheck per functionality (full system): accuracy of the binary decision
    func_rows = []
    _, f_full, _ = lines["rules + learned (shipped)"]
    funcs = sorted({e.functionality for e in held if e.source == "hatecheck"})
    for fn in funcs:
        idx = [i for i, e in enumerate(held) if e.functionality == fn]
        acc = np.mean([f_full[i] == bool(y[i]) for i in idx])
        func_rows.append(f"| {fn} | {len(idx)} | {acc:.2f} |")

    safe = read_lines("safe_lookalikes.txt")
    safe_res = {n: m.check_many(safe) for n, m in (("rules + learned (shipped)", full), ("rules only", rules))}
    unsafe = [l.split("\t", 1) for l in read_lines("unsafe_prompts.txt")]
    unsafe_res = {n: m.check_many([t for _, t in unsafe]) for n, m in (("rules + learned (shipped)", full), ("rules only", rules))}

    # independent hand-written sets (TSV: label, text): "dev" guided the twelfth session's generated training
    # text, "dev2" and "dev3" the thirteenth's, "chatdev" the fourteenth's; "test" to "test6" and "chattest"
    # were only measured
    fresh_rows = []
    for split in ("dev", "dev2", "dev3", "chatdev", "test", "test2", "test3", "test4", "test5", "test6", "chattest"):
        us = [l.split("\t", 1) for l in read_lines(f"fresh_{split}_unsafe.tsv")]
        ss = [l.split("\t", 1) for l in read_lines(f"fresh_{split}_safe.tsv")]
        for n, m in (("rules + learned (shipped)", full), ("rules only", rules)):
            ru, rs_ = m.check_many([t for _, t in us]), m.check_many([t for _, t in ss])
            fam = sum(any(f.split("/")[0] == c.split("/")[0] for f in r.flagged_categories)
                      for (c, _), r in zip(us, ru))
            hit, ff = sum(r.flagged for r in ru), sum(r.flagged for r in rs_)
            fresh_rows.append(f"| {split} | {n} | {hit}/{len(us)} ({hit/len(us):.1%}) | {fam}/{len(us)} "
                              f"({fam/len(us):.1%}) | {ff}/{len(ss)} ({ff/len(ss):.1%}) |")

    # the last assistant reply of each chosen transcript in the shared hh-rlhf file: unlabelled and mostly benign
    # (answers to red-teaming prompts), so its flag rate is an upper bound on the output check's false refusals
    hh_line = []
    hh_path = Path(d).parent / "preferences" / "hh_harmless_dev.jsonl.gz"
    import gzip
    import json

    if hh_path.is_file():
        with gzip.open(hh_path, "rt", encoding="utf-8") as f:
            replies = [json.loads(l)["chosen"].rsplit("\n\nAssistant:", 1)[1].strip() for l in f if l.strip()]
        flagged = [r.flagged for r in full.check_many(replies)]
        long_ = [fl for fl, r in zip(flagged, replies) if len(r.split()) >= 40]
        hh_line = ["", "## Assistant replies (hh-rlhf, unlabelled)", "",
                   f"The last assistant reply of the {len(replies):,} chosen transcripts in "
                   "`../shared/data/preferences/hh_harmless_dev.jsonl.gz` (answers to red-teaming prompts, mostly "
                   f"benign; no labels): **{sum(flagged) / len(replies):.1%}** flagged; of the {len(long_)} with 40 "
                   f"words or more, {sum(long_) / max(1, len(long_)):.1%}."]

    # real red-team prompts: the first human turn of every 4th hh-rlhf record, labelled by one annotator
    # (hh_redteam_labels.tsv holds index and label only; the texts are read from ../shared)
    hh_lab_line = []
    lab_path = HERE / "hh_redteam_labels.tsv"
    if hh_path.is_file() and lab_path.is_file():
        labels = dict(l.split("\t") for l in read_lines(lab_path.name))
        with gzip.open(hh_path, "rt", encoding="utf-8") as f:
            recs = [json.loads(l) for l in f if l.strip()]
        firsts = {int(i): recs[int(i)]["chosen"].split("\n\nHuman:", 1)[1].split("\n\nAssistant:", 1)[0].strip()
                  for i in labels}
        idx = sorted(firsts)
        harm = [i for i in idx if labels[str(i)] != "none"]
        hh_lab_line = ["", "## Real red-team prompts (hh-rlhf, labelled)", "",
                       f"The first human turn of {len(idx)} hh-rlhf harmless-base records (every 4th) in "
                       "`../shared/data/preferences/hh_harmless_dev.jsonl.gz`, labelled by one annotator "
                       f"(`bench/moderation/hh_redteam_labels.tsv`): {len(harm)} harmful, {len(idx) - len(harm)} "
                       "not. Never used for training or for any choice.", "",
                       "| system | harmful flagged | not harmful, flagged |", "|---|---|---|"]
        for n, m in (("rules + learned (shipped)", full), ("rules only", rules)):
            res = dict(zip(idx, m.check_many([firsts[i] for i in idx])))
            hit = sum(res[i].flagged for i in harm)
            ff = sum(res[i].flagged for i in idx if i not in set(harm))
            hh_lab_line.append(f"| {n} | {hit}/{len(harm)} ({hit / max(1, len(harm)):.1%}) | "
                               f"{ff}/{len(idx) - len(harm)} ({ff / max(1, len(idx) - len(harm)):.1%}) |")

    # speed: one text per call, as the chat path calls it
    sample = texts[:1000]
    t = time.perf_counter()
    for s_ in sample:
        rules.check(s_)
    rules_tps = len(sample) / (time.perf_counter() - t)
    sample2 = texts[:300]
    t = time.perf_counter()
    for s_ in sample2:
        full.scorer.score([s_])
    learned_ms = (time.perf_counter() - t) / len(sample2) * 1e3
    t = time.perf_counter()
    for s_ in sample2:
        full.check(s_)
    full_ms = (time.perf_counter() - t) / len(sample2) * 1e3
    t = time.perf_counter()
    full.check_many(texts[:2000])
    batch_tps = 2000 / (time.perf_counter() - t)

    md = ["# Moderation benchmark", "",
          "Produced by `python bench/moderation/bench_moderation.py` (CPU only, single process).", "",
          "## Held-out development data (binary: any category)", "",
          "20% of davidson (by normalised text) and of hatecheck (by template id), never used for training or tuning.",
          "Positive = davidson hate or offensive; hatecheck hateful, or abuse of an individual / non-protected group "
          "(see `minichat/moderation/data.py`). The score is the maximum category score. Note the prevalence: a "
          "random scorer's AUPRC equals the positive share, so davidson's 83% positives make its AUPRC easy; the "
          "balanced row and the hatecheck row are the harder views. This is not OpenAI's 1,680-text eval set "
          "(not available here), so the figures are not directly comparable with the published 0.856.", ""] + out + [
          "", "Hatecheck held-out accuracy per functionality (rules + learned):", "",
          "| functionality | n | accuracy |", "|---|---|---|"] + func_rows + ["", "## Safe look-alike prompts", "",
          f"{len(safe)} hand-written safe prompts that sound dangerous (`bench/moderation/safe_lookalikes.txt`).", ""]
    for n, rs in safe_res.items():
        ff = [(t_, r) for t_, r in zip(safe, rs) if r.flagged]
        md.append(f"- {n}: {len(ff)}/{len(safe)} wrongly flagged = **{len(ff)/len(safe):.1%}**")
        for t_, r in ff:
            md.append(f"  - `{t_}` -> {', '.join(r.flagged_categories)} (rules: {', '.join(r.fired_rules) or 'none; learned'})")
    md += ["", "## Hand-written harmful chat prompts", "",
           f"{len(unsafe)} prompts across all 13 categories (`bench/moderation/unsafe_prompts.txt`).", ""]
    for n, rs in unsafe_res.items():
        hit = sum(r.flagged for r in rs)
        cat_hit = sum(c in r.flagged_categories for (c, _), r in zip(unsafe, rs))
        md.append(f"- {n}: flagged {hit}/{len(unsafe)} ({hit/len(unsafe):.0%}); expected category flagged "
                  f"{cat_hit}/{len(unsafe)}")
        for (c, t_), r in zip(unsafe, rs):
            if not r.flagged:
                md.append(f"  - missed: `{t_}` (expected {c})")
    md += ["", "## Independent hand-written sets", "",
           "Written by eleven helpers, one per set, who read neither the rules nor the other sets: harmful "
           "messages labelled with their category, benign messages that share their words. Development sets, whose "
           "misses were read: `fresh_dev_*` (200 + 200 chat requests and statements) guided the twelfth session's "
           "generated training text (`minichat/moderation/synth_frames.py`), `fresh_dev2_*` (180 + 170, weighted to "
           "violence, hate threats, self-harm promotion, graphic violence and illicit; no sexual/minors) and "
           "`fresh_dev3_*` (132 + 132 web-text excerpts of 40–120 words: forum posts, reviews, stories) the "
           "thirteenth's. Test sets, only measured: `fresh_test_*` (160 + 160, a third of them social posts and "
           "longer messages), `fresh_test2_*` (156 + 156, two thirds texts of 2–5 sentences with the harmful one "
           "among ordinary ones), `fresh_test3_*` (182 + 182, half chatbot messages, a quarter social posts, a "
           "quarter short passages; euphemistic self-harm), `fresh_test4_*` (144 + 156, written during the "
           "thirteenth session: 12 texts for each category but sexual/minors, which the helper declined to write) "
           "and `fresh_test5_*` (144 + 144, written after all of the thirteenth session's changes and measured once "
           "per version; a third each requests, posts and passages; no sexual/minors) and `fresh_test6_*` (132 + 132 "
           "web-text excerpts like dev3's, written by another helper at the same time). Chat turns, written by two "
           "helpers at the same time during the fourteenth session: `fresh_chatdev_*` (development; 144 harmful, a "
           "quarter of them assistant replies, + 240 benign: terse mid-conversation turns, follow-ups, feelings, tasks, "
           "assistant answers, ordinary uses of sensitive words) and `fresh_chattest_*` (the same brief; measured "
           "twice, see bench/results/moderation_chat.md). Since the twentieth session the learned scorer also trains "
           "on 3,681 + 4,577 texts that sixteen other helpers wrote as training data, in three rounds (`minichat/moderation/written`; "
           "texts that nearly repeat any evaluation text were removed); their weight and the heads' bias shift "
           "were chosen on the dev sets; the test sets were only measured, not used to choose. \"Right family\": a "
"flagged category of the labelled one's family (e.g. violence/graphic for violence).", "",
           "| set | system | harmful flagged | right family | benign wrongly flagged |", "|---|---|---|---|---|"]
    md += fresh_rows + hh_line + hh_lab_line
    md += ["", "## Speed (this machine, one text per call)", "",
           f"- rules only: **{rules_tps:,.0f} texts/s** (target >= 1,000)",
           f"- learned scorer alone: **{learned_ms:.2f} ms/text** (target <= 10 ms)",
           f"- rules + learned: {full_ms:.2f} ms/text; batched check_many: {batch_tps:,.0f} texts/s", ""]
    md += ["## Notes", "",
           "- The safe and harmful prompt files were written by hand for this bench after the rules. The rules "
           "were not iterated on them. The twelfth session's generated training text was written after their "
           "misses and the `fresh_dev` set's had been read, so their figures are development figures; "
           "`fresh_test` is the unseen check. The thirteenth session's self-harm rules were written after the "
           "harmful file's missed pills message had been read.",
           "- Hatecheck's weak spots (see the functionality table): counter-speech that quotes hate, negated hate "
           "and positive statements about groups are often flagged; the learned scorer over-weights identity terms.",
           "- Speed is measured on a shared 2-core machine with other jobs running; rerun for quiet-machine figures.",
           ""]
    text = "\n".join(md) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(a.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
