"""`minichat label`: the human-feedback labeling app (demonstrations, rankings, ratings) and its exports.

    minichat label user add alice --role admin            # prints alice's token (or --password PW)
    minichat label user add bob; minichat label user set carol --held-out
    minichat label project create helpful --guidelines guide.md --tasks demonstration,ranking,rating \\
        --models smollm2 --k 4 --overlap 2 --temperature 0.7
    minichat label import helpful prompts.jsonl --sample  # JSONL or CSV; --sample draws the K answers now
    minichat label sample helpful [--model sft=runs/sft]  # answers for tasks that have none
    minichat label serve --port 8001                      # the page at http://127.0.0.1:8001/label/
    minichat label stats [--project helpful]              # progress per project and labeler, agreement
    minichat label report [--project helpful] [--baseline sft] [--out report.md] [--json]   # the models, judged
    minichat label export --out data/labels [--project P] [--labeler NAME] [--held-out exclude|include|only]
                                            [--since 2025-01-01] [--until ...]

`minichat serve` also serves the page at /label/ on its store. Every command takes --store URL (default: the
SQLite file minichat serve uses).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minichat.errors import MinichatError


from minichat.serve.feedback import _date  # noqa: E402 (the same --since/--until parsing)


def _open(url: str | None):
    from minichat.label.service import Labeling
    from minichat.serve.store import Store

    return Labeling(Store(url or None))


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise MinichatError(f"guidelines file {p} does not exist")
    return p.read_text(encoding="utf-8")


def _print_stats(d: dict) -> None:
    for p in d["projects"]:
        tasks = ", ".join(f"{n} {k}" for k, n in sorted(p["tasks"].items())) or "no tasks"
        a = p["assignments"]
        print(f"project {p['name']}: {p['prompts']} prompts, {tasks}; {p['tasks_ready']} ready; "
              f"assignments done {a.get('done', 0)}, open {a.get('open', 0)}, skipped {a.get('skipped', 0)}; "
              f"{p['tasks_complete']} tasks complete at overlap {p['overlap']} ({100 * p['progress']:.0f}%); "
              f"comparisons {p['comparisons']}")
    for r in d["labelers"]:
        done = ", ".join(f"{n} {k}" for k, n in sorted(r["done"].items())) or "nothing done"
        ag = "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%"
        print(f"  {r['labeler']:<16} {r['role']:<8}{' held-out' if r['held_out'] else '':<9} {done}; "
              f"skipped {r['skipped']}, open {r['open']}; agreement {ag}; last active {r['last_active']}")
    ag = d["agreement"]
    if ag["agreement"] is not None:
        print(f"inter-labeler agreement on comparisons: {100 * ag['agreement']:.1f}% over {ag['pairs']} answer pairs "
              f"of {ag['tasks']} tasks ranked by several labelers")
    else:
        print("inter-labeler agreement: no task has been ranked by two labelers yet")
    ra = ag.get("ratings") or {}
    if ra.get("pairs"):
        alpha = "-" if ra["alpha"] is None else f"{ra['alpha']:.2f}"
        print(f"Likert ratings of the same answer: {100 * ra['exact']:.1f}% equal, {100 * ra['within_one']:.1f}% within "
              f"one point, mean difference {ra['mean_abs_diff']:.2f}, Krippendorff's alpha {alpha} "
              f"({ra['pairs']} pairs over {ra['answers']} answers)")
    flags = ag.get("flags") or {}
    if flags:
        print("metadata flags, agreement (alpha): " + ", ".join(
            f"{f} {100 * r['exact']:.0f}% ({'-' if r['alpha'] is None else format(r['alpha'], '.2f')})"
            for f, r in sorted(flags.items())))


def _project_cmd(argv: list[str]) -> int:
    from minichat import config as C
    from minichat.label.service import ProjectConfig

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: minichat label project {create,update,list,show} ...\n"
              "  create NAME [--guidelines FILE.md] [--tasks ...] [--models ...] [--k 4] [--overlap 2] ...\n"
              "  update NAME [--guidelines FILE.md] [settings to change]\n  list\n  show NAME")
        return 0
    cmd, rest = argv[0], argv[1:]

    def extra(ap):
        ap.add_argument("name", nargs="?" if cmd == "list" else None)
        ap.add_argument("--guidelines", help="Markdown file of labeling instructions shown beside every task")
        ap.add_argument("--store", help="SQLAlchemy URL of the store")

    if cmd == "create":
        cfg, ns = C.build(ProjectConfig, rest, prog="minichat label project create",
                          description="Create a labeling project.", extra=extra)
        p = _open(ns.store).create_project(ns.name, cfg, _read_text(ns.guidelines) or "")
        print(f"created project {p['name']!r} (id {p['id']}): {json.dumps(p['settings'])}")
        return 0
    if cmd in ("update", "show", "list"):
        ap = argparse.ArgumentParser(prog=f"minichat label project {cmd}")
        extra(ap)
        ns, overrides = ap.parse_known_args(rest)
        lab = _open(ns.store)
        if cmd == "list":
            for p in lab.projects():
                print(f"{p['id']:>4}  {p['name']:<24} {json.dumps(p['settings'])}")
            return 0
        if cmd == "show":
            p = lab.project(ns.name)
            print(json.dumps(p, indent=2))
            return 0
        cfg = lab.project_config(ns.name)
        for key, val in C.parse_overrides(overrides):
            C.set_path(cfg, key, val)
        p = lab.update_project(ns.name, guidelines=_read_text(ns.guidelines), cfg=cfg)
        print(f"updated project {p['name']!r}: {json.dumps(p['settings'])}")
        return 0
    raise MinichatError(f"unknown project command {cmd!r}; use create, update, list or show")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "project":
        return _project_cmd(argv[1:])
    ap = argparse.ArgumentParser(prog="minichat label", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def store_arg(p):
        p.add_argument("--store", help="SQLAlchemy URL of the store (default: the SQLite file minichat serve uses)")
        return p

    sub.add_parser("project", help="create, update, list or show projects (minichat label project --help)")

    u = sub.add_parser("user", help="labeler accounts")
    usub = u.add_subparsers(dest="user_cmd", required=True)
    ua = store_arg(usub.add_parser("add", help="add a labeler or admin; prints their token"))
    ua.add_argument("name")
    ua.add_argument("--role", default="labeler", choices=["labeler", "admin"])
    ua.add_argument("--password", help="a password instead of a generated token (at least 8 characters)")
    ua.add_argument("--held-out", action="store_true", help="their judgments are for evaluation only")
    us = store_arg(usub.add_parser("set", help="change a user: held-out, role, active, new token"))
    us.add_argument("name")
    us.add_argument("--held-out", dest="held_out", action="store_true", default=None)
    us.add_argument("--not-held-out", dest="held_out", action="store_false")
    us.add_argument("--role", choices=["labeler", "admin"])
    us.add_argument("--active", dest="active", action="store_true", default=None)
    us.add_argument("--inactive", dest="active", action="store_false")
    us.add_argument("--new-token", action="store_true", help="replace their secret by a new token (printed)")
    us.add_argument("--password", help="replace their secret by this password")
    store_arg(usub.add_parser("list", help="list users"))

    im = store_arg(sub.add_parser("import", help="import prompts (JSONL or CSV) into a project"))
    im.add_argument("project")
    im.add_argument("file")
    im.add_argument("--sample", action="store_true", help="sample the answers of ranking/rating tasks right away")
    im.add_argument("--device", default="cpu")

    sa = store_arg(sub.add_parser("sample", help="sample answers for ranking/rating tasks that have none"))
    sa.add_argument("project")
    sa.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                    help="sample from these models instead of the project's (repeatable)")
    sa.add_argument("--device", default="cpu")
    sa.add_argument("--batch", type=int, default=16)

    sv = store_arg(sub.add_parser("serve", help="serve the labeling page alone (no models loaded)"))
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8001)
    sv.add_argument("--session-hours", type=float, default=14 * 24,
                    help="how long a login lasts before the page asks again (default 336 = 14 days)")

    ex = store_arg(sub.add_parser("export", help="write sft/rankings/pairs/ratings JSONL for the trainers"))
    ex.add_argument("--out", "-o", required=True, help="output folder")
    ex.add_argument("--project")
    ex.add_argument("--labeler", action="append", default=[], help="only this labeler's work (repeatable)")
    ex.add_argument("--held-out", default="exclude", choices=["exclude", "include", "only"],
                    help="held-out labelers' work: exclude (training, the default), include, only (evaluation)")
    ex.add_argument("--since", type=_date, help="submitted at or after this UTC date/time")
    ex.add_argument("--until", type=_date, help="submitted before this UTC date/time")
    ex.add_argument("--no-meta", action="store_true", help="leave out each line's 'meta'")

    st = store_arg(sub.add_parser("stats", help="progress per project and labeler, and agreement"))
    st.add_argument("--project")
    st.add_argument("--json", action="store_true")

    rp = store_arg(sub.add_parser("report", help="the models as the labelers judged them: Likert, win rates, "
                                                 "flags; all, training and held-out labelers"))
    rp.add_argument("--project")
    rp.add_argument("--baseline", help="report every model's win rate against this one (e.g. sft)")
    rp.add_argument("--labeler", action="append", default=[], help="only this labeler's work (repeatable)")
    rp.add_argument("--since", type=_date, help="submitted at or after this UTC date/time")
    rp.add_argument("--until", type=_date, help="submitted before this UTC date/time")
    rp.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals (default 1000)")
    rp.add_argument("--json", action="store_true", help="the numbers as JSON instead of Markdown")
    rp.add_argument("--out", "-o", help="also write the report to this file (atomically)")

    ns = ap.parse_args(argv)
    if ns.cmd == "project":
        return _project_cmd(["--help"])

    if ns.cmd == "serve":
        import uvicorn

        from minichat.label.web import create_app
        from minichat.serve.store import Store

        store = Store(ns.store or None)
        if ns.session_hours <= 0:
            raise MinichatError(f"--session-hours must be positive, got {ns.session_hours}")
        app = create_app(store, ns.session_hours)
        print(f"minichat label: http://{ns.host}:{ns.port}/label/  (store {store.safe_url})", flush=True)
        uvicorn.run(app, host=ns.host, port=ns.port, log_level="info", timeout_graceful_shutdown=5)
        store.close()
        return 0

    lab = _open(ns.store)
    try:
        if ns.cmd == "user":
            if ns.user_cmd == "add":
                user, secret = lab.add_user(ns.name, role=ns.role, secret=ns.password, held_out=ns.held_out)
                print(f"added {user['role']} {user['name']}{' (held out)' if user['held_out'] else ''}")
                if not ns.password:
                    print(f"token: {secret}")
            elif ns.user_cmd == "set":
                secret = None
                if ns.new_token:
                    import secrets as _s

                    secret = _s.token_urlsafe(18)
                elif ns.password:
                    if len(ns.password) < 8:
                        raise MinichatError("a password must have at least 8 characters")
                    secret = ns.password
                user = lab.update_user(ns.name, role=ns.role, held_out=ns.held_out, active=ns.active, secret=secret)
                print(json.dumps(user))
                if ns.new_token:
                    print(f"token: {secret}")
            else:
                for user in lab.users():
                    print(f"{user['name']:<20} {user['role']:<8} {'held-out' if user['held_out'] else '':<9}"
                          f"{'' if user['active'] else 'inactive'}")
        elif ns.cmd == "import":
            from minichat.label.importer import read_prompts

            counts = lab.import_prompts(ns.project, read_prompts(ns.file))
            print(f"imported {counts['prompts']} prompts into {ns.project!r}: {counts['tasks']} tasks, "
                  f"{counts['answers']} answers given with the prompts")
            if ns.sample:
                _sample(lab, ns.project, [], ns.device, 16)
        elif ns.cmd == "sample":
            _sample(lab, ns.project, ns.model, ns.device, ns.batch)
        elif ns.cmd == "export":
            from minichat.label.export import export

            counts = export(lab, ns.out, meta=not ns.no_meta, project=ns.project, labelers=ns.labeler,
                            held_out=ns.held_out, since=ns.since, until=ns.until)
            print(f"exported to {ns.out}: {counts['prompts']} prompts, {counts['demonstrations']} demonstrations "
                  f"(sft.jsonl), {counts['rankings']} rankings = {counts['comparisons']} comparisons "
                  f"(rankings.jsonl; {counts['pairs']} ordered pairs in pairs.jsonl), {counts['ratings']} ratings "
                  f"(ratings.jsonl)")
        elif ns.cmd == "report":
            from minichat.label.report import evaluation, to_json, to_markdown

            if ns.bootstrap < 10:
                raise MinichatError(f"--bootstrap must be at least 10, got {ns.bootstrap}")
            rows = lab.export_rows(project=ns.project, labelers=ns.labeler, held_out="include", since=ns.since,
                                   until=ns.until)
            rep = evaluation(rows, ns.baseline, n_boot=ns.bootstrap)
            text = to_json(rep) if ns.json else to_markdown(
                rep, f"Human evaluation{' of project ' + ns.project if ns.project else ''}")
            if ns.out:
                from minichat.checkpoint import atomic_write_text

                atomic_write_text(ns.out, text + "\n")
            print(text)
        elif ns.cmd == "stats":
            from minichat.label.models import ROLES

            d = lab.dashboard({"id": 0, "name": "", "role": ROLES[0]}, ns.project)  # the CLI sees everything
            if ns.json:
                print(json.dumps(d, indent=2))
            else:
                _print_stats(d)
    finally:
        lab.store.close()
    return 0


def _sample(lab, project: str, models: list[str], device: str, batch: int) -> None:
    from minichat.label.sampling import sample_project

    got = sample_project(lab, project, models=models or None, device=device, batch=batch,
                         progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"sampled {got['answers']} answers for {got['tasks']} tasks"
          + (f"; {got['skipped']} tasks left without answers (prompt too long)" if got["skipped"] else ""))
