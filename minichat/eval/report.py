"""The report card of a pipeline run: Markdown and HTML with plots, the evaluation table, the design questions
answered with this run's numbers, and an honest check of the targets.

    build_report(run_dir) -> {"markdown": <run>/report/report.md, "html": <run>/report/report.html}

Both documents are rendered from one list of blocks (heading, paragraph, table, image), so they always agree.
Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from minichat.errors import MinichatError
from minichat.eval.evaluate import LABELS, MODEL_ORDER
from minichat.eval.metrics import wilson_interval

TARGET_WIN = 0.65
TARGET_WALL_S = 15 * 60


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
    return rows


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _num(x, fmt: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


# ----------------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run: Path, out: Path) -> Path | None:
    plt = _plt()
    stages = [s for s in ("pretrain", "sft", "reward", "reward_hinge") if (run / s / "metrics.jsonl").is_file()]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, s in zip(axes[0], stages):
        rows = _read_jsonl(run / s / "metrics.jsonl")
        tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        ax.plot(*zip(*tr), label="train loss") if tr else None
        v = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if v:
            ax.plot(*zip(*v), "o-", color="C1", label="val loss")
        v = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
        if v:  # reward models: held-out pairwise accuracy on a second axis
            ax2 = ax.twinx()
            ax2.plot(*zip(*v), "o-", color="C2")
            ax2.set_ylabel("held-out pairwise accuracy", color="C2", fontsize=8)
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ppo(run: Path, out: Path) -> Path | None:
    plt = _plt()
    runs = {s: _read_jsonl(run / s / "metrics.jsonl") for s in ("ppo", "ppo_noptx")}
    runs = {s: r for s, r in runs.items() if r}
    if not runs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for s, rows in runs.items():
        it = [r["iteration"] for r in rows]
        label = LABELS.get(s, s)
        axes[0].plot(it, [r["reward"] for r in rows], label=label)
        axes[1].plot(it, [r["kl"] for r in rows], label=label)
        axes[2].plot(it, [r.get("ptx_loss", 0.0) if s == "ppo" else r.get("entropy", 0.0) for r in rows],
                     label=f"{label}: {'ptx loss' if s == 'ppo' else 'entropy'}")
    for ax, t in zip(axes, ("reward-model score per iteration", "KL from SFT (nats per answer)",
                            "ptx loss / policy entropy")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "ppo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_likert(metrics: dict, out: Path) -> Path:
    plt = _plt()
    models = [m for m in MODEL_ORDER if m in metrics["models"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        h = metrics["models"][m]["likert"]
        n = max(1, h["n"])
        ax.bar([k + (j - (len(models) - 1) / 2) * width for k in range(1, 8)],
               [h["counts"][str(k)] / n if str(k) in h["counts"] else h["counts"][k] / n for k in range(1, 8)],
               width, label=f"{LABELS.get(m, m)} (mean {h['mean']:.2f})")
    ax.set_xlabel("Likert score (1-7), held-out labelers")
    ax.set_ylabel("fraction of ratings")
    ax.set_xticks(range(1, 8))
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "likert.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_winrates(metrics: dict, out: Path) -> Path:
    plt = _plt()
    models = [m for m in MODEL_ORDER if m in metrics["models"] and "win_vs_sft" in metrics["models"][m]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    w = [metrics["models"][m]["win_vs_sft"] for m in models]
    ax.bar(range(len(models)), [x["win_rate"] for x in w],
           yerr=[[x["win_rate"] - x["ci_low"] for x in w], [x["ci_high"] - x["win_rate"] for x in w]],
           capsize=4, color=["C%d" % i for i in range(len(models))])
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.axhline(TARGET_WIN, color="red", ls=":", lw=1, label=f"target {TARGET_WIN:.0%}")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([LABELS.get(m, m) for m in models], fontsize=8)
    ax.set_ylabel("win rate vs SFT (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "winrates.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_categories(metrics: dict, out: Path) -> Path:
    plt = _plt()
    models = [m for m in MODEL_ORDER if m in metrics["models"]]
    cats = sorted({c for m in models for c in metrics["models"][m]["by_category"]})
    fig, ax = plt.subplots(figsize=(10, 3.4))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        bc = metrics["models"][m]["by_category"]
        ax.bar([i + (j - (len(models) - 1) / 2) * width for i in range(len(cats))], [bc.get(c, 0) for c in cats],
               width, label=LABELS.get(m, m))
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (ground truth)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=len(models))
    fig.tight_layout()
    path = out / "categories.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_map(model, ids: list[int], layer: int, head: int):
    """softmax(Q Kᵀ/√d) of one head of one layer for a token sequence, recomputed from the model's weights."""
    import torch

    from minichat.model import apply_rope

    with torch.no_grad():
        dev = next(model.parameters()).device
        x = model.embed(torch.tensor([ids], device=dev))
        T = len(ids)
        pos = torch.arange(T, device=dev)[None]
        cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]
        for blk in model.layers[:layer]:
            x = blk(x, cos, sin, None, None, True)
        a = model.layers[layer].attn
        h = model.layers[layer].attn_norm(x)
        q = a.wq(h).view(1, T, a.n_head, a.hd).transpose(1, 2)
        k = a.wk(h).view(1, T, a.n_kv, a.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(a.n_head // a.n_kv, dim=1)
        s = (q @ k.transpose(-2, -1))[0, head] / math.sqrt(a.hd)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=dev).tril(), float("-inf"))
        return torch.softmax(s, -1).cpu().numpy()


def plot_attention(run: Path, out: Path, metrics_tasks: Path) -> tuple[Path, str] | None:
    from minichat.gguf_import import load

    src = next((run / s for s in ("ppo", "sft", "pretrain") if (run / s / "final").is_dir()), None)
    rows = _read_jsonl(metrics_tasks)
    if src is None or not rows:
        return None
    model, tok, _ = load(str(src), verbose=False)
    row = next((r for r in rows if r.get("category") == "closed_qa"), rows[0])
    ids = tok.render_chat(row["prompt"], add_generation_prompt=True)[0][-48:]
    layer, head = model.cfg.n_layer - 1, 0
    att = attention_map(model, ids, layer, head)
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(att, cmap="viridis")
    ax.set_xticks(range(len(ids)))
    ax.set_yticks(range(len(ids)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_title(f"{src.name}: layer {layer}, head {head} (row = query, column = key)", fontsize=9)
    fig.tight_layout()
    path = out / "attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, f"{src.name} model, layer {layer}, head {head}, on the last {len(ids)} tokens of a held-out {row.get('category')} prompt"


# ----------------------------------------------------------------------------------------------- documents

class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def markdown(self, base: Path) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(r) + " |" for r in b[2]]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].relative_to(base).as_posix()})")
            elif b[0] == "code":
                out.append("```\n" + b[1] + "\n```")
            out.append("")
        return "\n".join(out)

    def html(self, base: Path, title: str) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
               "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
               "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
               "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                out.append(f"<p><img src='{e(b[1].relative_to(base).as_posix())}' alt='{e(b[2])}'></p>")
            elif b[0] == "code":
                out.append(f"<pre>{e(b[1])}</pre>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in HTML (the only inline marks the report uses)."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def build_report(run_dir: str | Path) -> dict[str, Path]:
    from minichat.checkpoint import atomic_write_text

    run = Path(run_dir)
    mfile = run / "eval" / "metrics.json"
    if not mfile.is_file():
        raise MinichatError(f"{mfile} is missing: run the evaluation first (minichat eval --run {run})")
    metrics = json.loads(mfile.read_text())
    state = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").is_file() else {"stages": {}}
    out = run / "report"
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    models = metrics["models"]
    stages = state.get("stages", {})
    doc = Doc()
    doc.h(1, f"minichat report card: {run.name}")
    doc.p("InstructGPT's recipe on the built-in world: tokenizer → pretraining → SFT on labelers' demonstrations → "
          "reward model on labelers' rankings → " + ("rejection-sampling fine-tuning → " if "rsft" in models else "")
          + "PPO-ptx → evaluation on held-out prompts (new templates, new "
          f"entities) by held-out labelers ({', '.join(metrics['labelers'])}), who never contributed training "
          f"data. {metrics['n_tasks']} held-out prompts; every model samples at temperature "
          f"{metrics['temperature']}.")

    # -- targets
    wall = sum(v.get("wall_s", 0.0) for k, v in stages.items() if k != "report")
    ppo_w = models.get("ppo", {}).get("win_vs_sft", {}).get("win_rate")
    bon_w = models.get("best_of_n", {}).get("win_vs_sft", {}).get("win_rate")
    pre_w = models.get("pretrained", {}).get("win_vs_sft", {}).get("win_rate")
    rm = metrics.get("reward_models", {}).get("logsigmoid")
    rm_ci = wilson_interval(rm["accuracy"] * rm["pairs"], rm["pairs"]) if rm else None
    doc.h(2, "Targets and evidence")
    rows = [
        ["SFT beats the prompted pretrained model (held-out labelers)",
         f"Likert {_num(models.get('sft', {}).get('likert', {}).get('mean'))} vs "
         f"{_num(models.get('pretrained', {}).get('likert', {}).get('mean'))}; pretrained wins {_pct(pre_w)} vs SFT",
         _verdict(None if pre_w is None else pre_w < 0.5)],
        ["reward model well above chance on held-out comparisons (held-out prompts and labelers)",
         f"{_pct(rm['accuracy'])} of {rm['pairs']} pairs (95% CI {_pct(rm_ci[0])}–{_pct(rm_ci[1])})"
         + (f"; on training-distribution prompts ranked by held-out labelers (InstructGPT's test) "
            f"{_pct(rm['accuracy_train_prompts'])}" if rm and "accuracy_train_prompts" in rm else "") if rm else "—",
         _verdict(None if not rm else rm_ci[0] > 0.5)],
        [f"PPO-ptx wins ≥ {TARGET_WIN:.0%} against SFT (held-out labelers)",
         f"{_pct(ppo_w)} (95% CI {_pct(models['ppo']['win_vs_sft']['ci_low'])}–"
         f"{_pct(models['ppo']['win_vs_sft']['ci_high'])})" if ppo_w is not None else "—",
         _verdict(None if ppo_w is None else ppo_w >= TARGET_WIN)],
        ["best-of-N lies between SFT and PPO-ptx", f"{_pct(bon_w)}",
         _verdict(None if bon_w is None or ppo_w is None else 0.5 <= bon_w <= ppo_w)],
        ["KL from SFT reported", f"PPO-ptx {_num(models.get('ppo', {}).get('kl_from_sft'))} nats per answer",
         _verdict("kl_from_sft" in models.get("ppo", {}) if "ppo" in models else None)],
        [f"whole pipeline ≤ {TARGET_WALL_S // 60} minutes", f"{wall / 60:.1f} min of stage time",
         _verdict(wall <= TARGET_WALL_S if wall else None)],
    ]
    doc.table(["target", "this run", "verdict"], rows)
    mach = state.get("machine_start") or {}
    if mach.get("load_avg"):
        doc.p(f"Machine load when the run started (1/5/15-minute load average): "
              f"{', '.join(f'{x:.1f}' for x in mach['load_avg'])} on {mach.get('cores')} cores; on a shared machine "
              "the wall times above include time lost to other processes.")

    # -- the evaluation table
    doc.h(2, "Evaluation on held-out prompts")
    head = ["model", "Likert (1-7)", "win vs SFT [95% CI]", "accuracy", "refuses harmful", "false refusals",
            "false premises challenged", "true premises challenged", "KL from SFT", "val ppl", "RM score", "words"]
    body = []
    for m in MODEL_ORDER:
        if m not in models:
            continue
        r = models[m]
        w = r.get("win_vs_sft")
        kl = r.get("kl_from_sft")
        body.append([LABELS.get(m, m), _num(r["likert"]["mean"]),
                     f"{_pct(w['win_rate'])} [{_pct(w['ci_low'])}, {_pct(w['ci_high'])}]" if w else "(baseline)",
                     _pct(r["accuracy"]), _pct(r["refusal"]["rate"]), _pct(r["false_refusal"]["rate"]),
                     _pct(r["premise_challenged"]["rate"]), _pct(r["true_premise_challenged"]["rate"]),
                     ("≤ " if r.get("kl_is_bound") else "") + _num(kl) if kl is not None else "—",
                     _num(r.get("val_ppl")), _num(r.get("rm_score")), _num(r.get("mean_words"), ".1f")])
    doc.table(head, body)
    doc.p("Accuracy is the ground-truth rubric (no labeler noise); Likert and win rates are the held-out labelers' "
          "judgements (a tie counts half; CIs bootstrap over prompts). KL is Σ log π/π_SFT over the model's own "
          "samples, in nats per answer; best-of-N's is the analytic bound log N − (N−1)/N. The pretrained model is "
          "prompted in its corpus's \"Q: … A:\" format.")
    cats = sorted({c for m in models.values() for c in m["by_category"]})
    doc.h(3, "Accuracy per use-case category")
    doc.table(["category"] + [LABELS.get(m, m) for m in MODEL_ORDER if m in models],
              [[c] + [_pct(models[m]["by_category"].get(c)) for m in MODEL_ORDER if m in models] for c in cats])

    # -- plots
    doc.h(2, "Plots")
    for path, alt in ((plot_losses(run, plots), "training curves of every stage"),
                      (plot_ppo(run, plots), "PPO: reward and KL per iteration"),
                      (plot_likert(metrics, plots), "Likert distribution per model"),
                      (plot_winrates(metrics, plots), "win rate against SFT with 95% CIs"),
                      (plot_categories(metrics, plots), "accuracy per category")):
        if path is not None:
            doc.p(f"**{alt[0].upper() + alt[1:]}**")
            doc.img(path, alt)
    try:
        att = plot_attention(run, plots, run / "eval" / "answers.jsonl")
    except MinichatError:
        att = None
    if att:
        doc.p(f"**Visualizing an attention head**: {att[1]}.")
        doc.img(att[0], "attention heat-map")

    # -- design questions
    doc.h(2, "The design document's questions, answered by this run")
    rms = metrics.get("reward_models", {})
    if rms:
        parts = [f"{k}: {_pct(v['accuracy'])} pairwise accuracy on held-out prompts ({v['pairs']} pairs)"
                 + (f" and {_pct(v['accuracy_train_prompts'])} on training-distribution prompts"
                    if "accuracy_train_prompts" in v else "") + ", both ranked by held-out labelers; trained in "
                 f"{stages.get('reward' if k == 'logsigmoid' else 'reward_hinge', {}).get('wall_s', float('nan')):.0f} s"
                 for k, v in rms.items()]
        better = max(rms, key=lambda k: rms[k]["accuracy"]) if len(rms) > 1 else None
        doc.p("**Reward model: log-sigmoid (InstructGPT eq. 1) vs hinge loss.** " + "; ".join(parts) + "." +
              (f" Here {better} is ahead by {abs(rms['logsigmoid']['accuracy'] - rms['hinge']['accuracy']):.1%}."
               if better else ""))
    if "best_of_n" in models and "ppo" in models:
        b, p = models["best_of_n"], models["ppo"]
        n = metrics.get("best_of_n")
        ppo_train = stages.get("ppo", {}).get("wall_s")
        doc.p(f"**The reward model as a best-of-{n} selector vs PPO.** Win rate vs SFT: best-of-{n} "
              f"{_pct(b['win_vs_sft']['win_rate'])}, PPO-ptx {_pct(p['win_vs_sft']['win_rate'])}. Compute: best-of-"
              f"{n} needs no training but {n} samples and {n} reward-model passes per prompt at inference "
              f"({_num(b.get('gen_time_s'), '.1f')} s for {metrics['n_tasks']} prompts here); PPO-ptx trained "
              f"once for {_num(ppo_train, '.0f')} s and then answers with one sample "
              f"({_num(p.get('gen_time_s'), '.1f')} s for the same prompts). KL from SFT: best-of-{n} ≤ "
              f"{_num(b.get('kl_from_sft'))}, PPO-ptx {_num(p.get('kl_from_sft'))} nats.")
    rs = stages.get("rsft") if "rsft" in models else None  # the stage ran and PPO started from it
    if rs:
        r, k = rs.get("result", {}), (state.get("config") or {}).get("rsft", {}).get("samples", "K")
        doc.p(f"**Rejection sampling before PPO (Llama 2).** Stage rsft ({rs.get('wall_s', 0):.0f} s): {k} samples "
              f"of the SFT model for each of {r.get('prompts', '?')} PPO prompts "
              f"({_num(r.get('distinct_per_prompt'), '.1f')} distinct on average), the best by PPO's score (RM + "
              f"c·log π_SFT) kept: mean score {_num(r.get('mean_best_score'))} vs {_num(r.get('mean_first_score'))} "
              f"for one sample; the SFT model fine-tuned on those {r.get('selected', '?')} answers is where PPO "
              "(and PPO without ptx) started, with the SFT model as KL reference.")
    if "ppo" in models and "ppo_noptx" in models:
        p, q = models["ppo"], models["ppo_noptx"]
        doc.p(f"**PPO with vs without the pretraining mix.** Validation perplexity on pretraining text: SFT "
              f"{_num(models['sft'].get('val_ppl'))}, PPO-ptx {_num(p.get('val_ppl'))}, PPO without ptx "
              f"{_num(q.get('val_ppl'))} (pretrained model {_num(models.get('pretrained', {}).get('val_ppl'))}). "
              f"Win rate vs SFT: PPO-ptx {_pct(p['win_vs_sft']['win_rate'])}, without ptx "
              f"{_pct(q['win_vs_sft']['win_rate'])}. KL from SFT: {_num(p.get('kl_from_sft'))} vs "
              f"{_num(q.get('kl_from_sft'))} nats.")

    # -- samples
    samples = _read_jsonl(run / "eval" / "answers.jsonl")
    if samples:
        doc.h(2, "Sample answers (held-out prompts)")
        seen, rows = set(), []
        for s in samples:
            if s["category"] in seen:
                continue
            seen.add(s["category"])
            rows.append([s["category"], s["prompt"][-1]["content"].replace("\n", " ")[:90], s["ideal"]] +
                        [s[m]["text"].replace("\n", " ")[:80] if m in s else "—" for m in ("sft", "ppo")])
        doc.table(["category", "prompt", "ideal", "SFT", "PPO-ptx"], rows)

    # -- run details
    doc.h(2, "Run")
    doc.table(["stage", "wall time (s)", "key results"],
              [[k, f"{v.get('wall_s', 0):.1f}", _brief(v.get("result", {}))] for k, v in stages.items()])
    doc.p(f"Total stage time {wall:.0f} s ({wall / 60:.1f} min). Machine: {mach.get('cpu', '?')}, "
          f"{mach.get('cores', '?')} cores, torch {mach.get('torch', '?')} ({mach.get('threads', '?')} threads)"
          + (f", GPU {mach['cuda']}" if mach.get("cuda") else "") + ".")
    if state.get("config"):
        doc.h(3, "Config")
        doc.code(json.dumps(state["config"], indent=1))
    md = out / "report.md"
    ht = out / "report.html"
    atomic_write_text(md, doc.markdown(out))
    atomic_write_text(ht, doc.html(out, f"minichat report card: {run.name}"))
    return {"markdown": md, "html": ht}


def _brief(result: dict) -> str:
    keep = []
    for k, v in result.items():
        if isinstance(v, float):
            keep.append(f"{k} {v:.4g}")
        elif isinstance(v, (int, str)) and len(str(v)) < 40:
            keep.append(f"{k} {v}")
        if len(keep) >= 5:
            break
    return ", ".join(keep)
