"""OpenAI's fine-tuning API: supervised fine-tuning of a served model on an uploaded file, then served.

    f = client.files.create(file=open("chats.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="smollm2", suffix="support",
                                         hyperparameters={"n_epochs": 2})
    client.fine_tuning.jobs.list_events(job.id)       # "Step 10/40: training loss=1.234", ...
    job = client.fine_tuning.jobs.retrieve(job.id)    # queued -> running -> succeeded
    client.chat.completions.create(model=job.fine_tuned_model, messages=[...])

The file is the chat format OpenAI's fine-tuning takes ({"messages": [...]} per line, minichat's SFT reader also
takes prompt/response and Alpaca rows), or for `method` "dpo" OpenAI's preference rows ({"input",
"preferred_output", "non_preferred_output"}) run by `minichat dpo`; it is checked before the job is queued. Jobs run one at a time, each as
a `minichat sft` process (LoRA adapters, merged at the end, for models of 20M parameters and more; the whole model
below), on `--fine_tune_threads` threads so that serving keeps the rest of the cores. Hyperparameters: n_epochs
(default 3), batch_size (default 8, at most the number of conversations), learning_rate_multiplier (times the
preset's rate). The training loss is reported as events while it runs. On success the model is written under
`--fine_tune_dir`, named `ft:<base>:<suffix>:<job>`, and served at once beside the others (listed by /v1/models,
usable by every key); after a restart the server loads it again. Cancelling ends the process. Jobs belong to
the API key that made them, kept in the store (table `fine_tuning_jobs`) or in memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from minichat.serve.kept import MemoryRows
from minichat.serve.protocol import APIError, bad_request
from minichat.serve.responses import page

log = logging.getLogger("minichat.serve")
FINISHED = ("succeeded", "failed", "cancelled")
LORA_FROM_PARAMS = 20_000_000


def _now() -> int:
    return int(time.time())


def default_dir() -> Path:
    env = os.environ.get("MINICHAT_DATA_DIR")
    if env:
        return Path(env).expanduser() / "fine_tunes"
    import platformdirs

    return Path(platformdirs.user_data_dir("minichat", appauthor=False)) / "fine_tunes"


class JobStore:
    """Fine-tuning jobs and their events, per owner: in the server's store, or in memory without one."""

    def __init__(self, store=None):
        self.db = store
        self._mem = MemoryRows()  # (owner, body, events)

    async def put(self, body: dict, owner: str | None, events: list[dict]) -> None:
        if self.db is not None:
            await asyncio.to_thread(self.db.put_fine_tune, body, owner, events)
        else:
            self._mem.put(body["id"], owner, body, events)

    async def get(self, job_id: str, owner: str | None) -> tuple[dict, list[dict]]:
        from minichat.serve.store import NotFound

        found = None
        if self.db is not None:
            with contextlib.suppress(NotFound):
                found = await asyncio.to_thread(self.db.get_fine_tune, job_id, owner)
        else:
            found = self._mem.get(job_id, owner)
        if found is None:
            raise APIError(404, f"No such fine-tuning job: {job_id}", code="not_found")
        return found

    async def all(self, owner: str | None = None, everyone: bool = False) -> list[tuple[str | None, dict]]:
        if self.db is not None:
            return await asyncio.to_thread(self.db.list_fine_tunes, owner, everyone=everyone)
        return [(o, body) for o, body, _ in self._mem.rows(owner, everyone)]


def _check_lines(content: bytes, check_row, empty: str) -> tuple[int, str | None]:
    """(rows, problem): each non-empty line a JSON object that check_row(row, i) finds no problem with."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return 0, "the file is not UTF-8 text"
    rows = 0
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            return rows, f"line {i} is not valid JSON: {e}"
        problem = f"line {i} must be a JSON object" if not isinstance(row, dict) else check_row(row, i)
        if problem:
            return rows, problem
        rows += 1
    return (0, empty) if rows == 0 else (rows, None)


def _sft_row(row: dict, i: int) -> str | None:
    msgs = row.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            return f"line {i}: messages must be a non-empty list of message objects"
        if not any(m.get("role") == "assistant" for m in msgs):
            return f"line {i}: a conversation needs at least one assistant message to learn from"
    elif not (("prompt" in row and ("response" in row or "completion" in row)) or "instruction" in row):
        return f"line {i}: expected {{\"messages\": [...]}} (or prompt/response, or Alpaca) rows"
    return None


def _preference_row(row: dict, i: int) -> str | None:
    from minichat.data.chat import comparison_from_row
    from minichat.errors import MinichatError

    try:
        comparison_from_row(row, f"line {i}")
    except MinichatError as e:
        return str(e)
    return None


def check_training_file(content: bytes) -> tuple[int, str | None]:
    """(conversations, problem): a quick check of the file before a job is queued (the trainer reads it fully)."""
    return _check_lines(content, _sft_row, "the file has no training examples")


def check_preference_file(content: bytes) -> tuple[int, str | None]:
    """(pairs, problem) for a DPO job: OpenAI's preference rows, or any preference row minichat reads."""
    return _check_lines(content, _preference_row, "the file has no preference pairs")


class FineTuner:
    """Queues jobs and runs them one at a time as `minichat sft` processes; serves each result."""

    def __init__(self, jobs: JobStore, files, models, settings, root: Path, threads: int):
        self.jobs, self.files, self.models, self.settings = jobs, files, models, settings
        self.root, self.threads = root, threads
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._cancelled: set[str] = set()

    async def start(self) -> None:
        """At server start: serve earlier jobs' models again, and queue the jobs a stopped server left."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        for owner, body in await self.jobs.all(everyone=True):
            if body["status"] == "succeeded" and body.get("fine_tuned_model") and not body.get("_deleted"):
                path = self.root / body["id"] / "final"
                if path.is_dir() and body["fine_tuned_model"] not in self.models.models:
                    try:
                        await self._serve(body["fine_tuned_model"], path)
                    except Exception:  # noqa: BLE001 - one lost model must not stop the server
                        log.exception("could not serve %s again", body["fine_tuned_model"])
            elif body["status"] not in FINISHED:
                body["status"] = "queued"
                _, events = await self.jobs.get(body["id"], owner)
                events.append(_event(body["id"], "The server restarted; the job is queued again."))
                await self.jobs.put(body, owner, events)
                self._queue.put_nowait((body["id"], owner))

    async def stop(self) -> None:
        for p in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, job_id: str, owner: str | None) -> None:
        self._queue.put_nowait((job_id, owner))

    async def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)
        p = self._procs.get(job_id)
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)

    async def _loop(self) -> None:
        while True:
            job_id, owner = await self._queue.get()
            try:
                await self._run(job_id, owner)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported on the job
                log.exception("fine-tuning job %s failed", job_id)
                body, events = await self.jobs.get(job_id, owner)
                body.update(status="failed", finished_at=_now(),
                            error={"code": "server_error", "message": str(e), "param": None})
                events.append(_event(job_id, f"Fine-tuning job failed: {e}", "error"))
                await self.jobs.put(body, owner, events)
            finally:
                self._cancelled.discard(job_id)

    async def _run(self, job_id: str, owner: str | None) -> None:
        body, events = await self.jobs.get(job_id, owner)
        if body["status"] in FINISHED:
            return
        if job_id in self._cancelled:
            body.update(status="cancelled", finished_at=_now())
            await self.jobs.put(body, owner, events)
            return
        base = self.models.get(body["model"])
        out = self.root / job_id
        shutil.rmtree(out, ignore_errors=True)  # a rerun after a restart starts clean
        (out / "data").mkdir(parents=True)
        _, content = await self.files.get_file(body["training_file"], owner, content=True)
        (out / "data" / "train.jsonl").write_bytes(content)
        hp = body["hyperparameters"]
        rows = body["_rows"]
        steps = max(1, math.ceil(hp["n_epochs"] * rows / hp["batch_size"]))
        n_params = sum(p.numel() for p in base.worker.engine.model.parameters())
        lora = n_params >= LORA_FROM_PARAMS
        dpo = body["method"]["type"] == "dpo"
        if dpo:  # DPO's own rate for whole models; adapters take ten times more (as SFT's presets differ)
            from minichat.train.dpo import DPOConfig

            lr = DPOConfig().train.lr * (10 if lora else 1) * hp["learning_rate_multiplier"]
            verb = ["dpo", "--beta", repr(hp["beta"])] + (["--lora.rank", "16", "--lora.alpha", "32"] if lora else [])
        else:
            from minichat.train.sft import PRESETS

            lr = PRESETS["lora" if lora else "default"]().train.lr * hp["learning_rate_multiplier"]
            verb = ["sft", "--preset", "lora" if lora else "default"]
        preset = ("DPO" if dpo else "SFT") + (", LoRA" if lora else ", whole model")
        cmd = [sys.executable, "-m", "minichat.cli", *verb, "--init_from", str(base.source),
               "--data.train", str(out / "data" / "train.jsonl"), "--train.out_dir", str(out),
               "--train.max_steps", str(steps), "--train.batch_size", str(hp["batch_size"]),
               "--train.lr", repr(lr), "--train.min_lr", repr(lr / 10), "--train.warmup_steps", str(min(10, steps // 10)),
               "--train.log_every", str(max(1, steps // 20)), "--train.eval_every", str(steps),
               "--train.save_every", "0", "--train.progress", "false", "--runtime.threads", str(self.threads),
               "--runtime.seed", str(body["seed"])]
        if body.get("validation_file"):
            _, val = await self.files.get_file(body["validation_file"], owner, content=True)
            (out / "data" / "val.jsonl").write_bytes(val)
            cmd += ["--data.val", str(out / "data" / "val.jsonl")]
        body.update(status="running", trained_tokens=0, _last_step=0)  # a rerun after a restart counts afresh
        events.append(_event(job_id, f"Fine-tuning job started: {steps} steps ({preset}, learning rate {lr:g})."))
        await self.jobs.put(body, owner, events)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, env=env)
        self._procs[job_id] = proc
        err_task = asyncio.ensure_future(proc.stderr.read())
        seen = 0
        try:
            while proc.returncode is None:
                if job_id in self._cancelled:  # asked before the process existed
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                seen = await self._report_steps(body, owner, events, out / "metrics.jsonl", seen, steps)
        finally:
            self._procs.pop(job_id, None)
        stderr = (await err_task).decode("utf-8", "replace")
        seen = await self._report_steps(body, owner, events, out / "metrics.jsonl", seen, steps)
        if job_id in self._cancelled:
            body.update(status="cancelled", finished_at=_now())
            events.append(_event(job_id, "Fine-tuning job cancelled."))
        elif proc.returncode != 0 or not (out / "final").is_dir():
            last = [x for x in stderr.strip().splitlines() if x.strip()][-1:] or [f"exit status {proc.returncode}"]
            body.update(status="failed", finished_at=_now(),
                        error={"code": "training_failed", "message": last[0][-500:], "param": None})
            events.append(_event(job_id, f"Fine-tuning job failed: {last[0][-500:]}", "error"))
        else:
            name = f"ft:{body['model']}:{body.get('user_provided_suffix') or 'minichat'}:{job_id[-8:]}"
            await self._serve(name, out / "final")
            body.update(status="succeeded", finished_at=_now(), fine_tuned_model=name)
            events.append(_event(job_id, f"The model {name} is ready and served."))
        await self.jobs.put(body, owner, events)

    async def _report_steps(self, body, owner, events, metrics: Path, seen: int, steps: int) -> int:
        """New training-loss lines of the run's metrics.jsonl as events."""
        if not metrics.is_file():
            return seen
        lines = metrics.read_text(encoding="utf-8").splitlines()
        new = False
        last_step = body.get("_last_step", 0)
        for raw in lines[seen:]:
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break  # a line being written: read it next time
            seen += 1
            if "loss" in row and "step" in row:
                # tokens of the logged step, times the steps since the last log: an estimate of the total
                body["trained_tokens"] = int((body.get("trained_tokens") or 0)
                                             + row.get("trained_tokens", 0) * (row["step"] - last_step))
                last_step = body["_last_step"] = row["step"]
                events.append(_event(body["id"], f"Step {row['step']}/{steps}: training loss={row['loss']:.4f}",
                                     data={"step": row["step"], "train_loss": row["loss"], "total_steps": steps},
                                     type="metrics"))
                new = True
            elif "val_loss" in row:
                events.append(_event(body["id"], f"Step {row['step']}/{steps}: validation loss={row['val_loss']:.4f}",
                                     data={"step": row["step"], "valid_loss": row["val_loss"]}, type="metrics"))
                new = True
        if new:
            await self.jobs.put(body, owner, events)
        return seen

    async def _serve(self, name: str, path: Path) -> None:
        from minichat.serve.models import ModelRegistry

        loaded = await asyncio.to_thread(ModelRegistry.load, [f"{name}={path}"], self.settings,
                                         self.models.max_queue)
        self.models.add(loaded.models[name])


def _event(job_id: str, message: str, level: str = "info", data: dict | None = None, type: str = "message") -> dict:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:24]}", "created_at": _now(),
            "level": level, "message": message, "data": data or {}, "type": type}


def _public(body: dict) -> dict:
    return {k: v for k, v in body.items() if not k.startswith("_")}


def router(jobs: JobStore, tuner: FineTuner, files, models, owner_dep) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/fine_tuning/jobs")
    async def create(request: Request, owner: str | None = Depends(owner_dep)):
        from minichat.serve.app import read_json

        b = await read_json(request)
        if not isinstance(b, dict):
            raise bad_request("the request body must be a JSON object")
        if not isinstance(b.get("model"), str):
            raise bad_request("model is required: the name of a model this server serves", param="model")
        models.get(b["model"])  # 404 model_not_found
        if not isinstance(b.get("training_file"), str):
            raise bad_request("training_file is required", param="training_file")
        f, content = await files.get_file(b["training_file"], owner, content=True)
        if f["purpose"] != "fine-tune":
            raise bad_request(f"file {f['id']} was uploaded with purpose {f['purpose']!r}, not 'fine-tune'",
                              param="training_file")
        is_dpo = isinstance(b.get("method"), dict) and b["method"].get("type") == "dpo"
        check = check_preference_file if is_dpo else check_training_file
        rows, problem = check(content)
        if problem:
            raise bad_request(f"training_file {f['id']}: {problem}", param="training_file",
                              code="invalid_training_file")
        if b.get("validation_file") is not None:
            vf, vcontent = await files.get_file(b["validation_file"], owner, content=True)
            _, vproblem = check(vcontent)
            if vproblem:
                raise bad_request(f"validation_file {vf['id']}: {vproblem}", param="validation_file")
        method = b.get("method") or {"type": "supervised"}
        if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo"):
            raise bad_request("method.type must be 'supervised' or 'dpo' (reinforcement fine-tuning is not served "
                              "here)", param="method")
        kind = method["type"]
        hp_in = b.get("hyperparameters") or (method.get(kind) or {}).get("hyperparameters") or {}
        if not isinstance(hp_in, dict):
            raise bad_request("hyperparameters must be an object", param="hyperparameters")

        def num(key, default, cast, lo, hi):
            v = hp_in.get(key, "auto")
            if v in (None, "auto"):
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise bad_request(f"hyperparameters.{key} must be 'auto' or a number in [{lo}, {hi}]",
                                  param=f"hyperparameters.{key}")
            return cast(v)

        hp = {"n_epochs": num("n_epochs", 3, int, 1, 50),
              "batch_size": min(num("batch_size", 8, int, 1, 256), rows),
              "learning_rate_multiplier": num("learning_rate_multiplier", 1.0, float, 1e-3, 100.0)}
        if kind == "dpo":
            hp["beta"] = num("beta", 0.1, float, 1e-3, 2.0)
        suffix = b.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not 1 <= len(suffix) <= 64
                                   or not all(ch.isalnum() or ch in "-_" for ch in suffix)):
            raise bad_request("suffix must be 1-64 letters, digits, - or _", param="suffix")
        seed = b.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise bad_request("seed must be an integer in [0, 2^31)", param="seed")
        now = _now()
        body = {"id": f"ftjob-{uuid.uuid4().hex[:24]}", "object": "fine_tuning.job", "model": b["model"],
                "created_at": now, "finished_at": None, "fine_tuned_model": None, "organization_id": "minichat",
                "result_files": [], "status": "queued", "validation_file": b.get("validation_file"),
                "training_file": f["id"], "hyperparameters": hp, "trained_tokens": None, "error": None,
                "seed": seed, "estimated_finish": None, "integrations": [], "user_provided_suffix": suffix,
                "method": {"type": kind, kind: {"hyperparameters": hp}},
                "metadata": b.get("metadata"), "_rows": rows}
        await jobs.put(body, owner, [_event(body["id"], f"Validated the training file: {rows} examples."),
                                     _event(body["id"], "Fine-tuning job queued.")])
        tuner.submit(body["id"], owner)
        return _public(body)

    @r.get("/v1/fine_tuning/jobs")
    async def list_jobs(limit: int = 20, after: str | None = None, owner: str | None = Depends(owner_dep)):
        return page([_public(b) for _, b in await jobs.all(owner)], "desc", limit, after)

    @r.get("/v1/fine_tuning/jobs/{job_id}")
    async def get(job_id: str, owner: str | None = Depends(owner_dep)):
        return _public((await jobs.get(job_id, owner))[0])

    @r.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, limit: int = 20, after: str | None = None, owner: str | None = Depends(owner_dep)):
        return page((await jobs.get(job_id, owner))[1], "desc", limit, after, max_limit=1000)

    @r.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str, owner: str | None = Depends(owner_dep)):
        """OpenAI's model deletion, for the fine-tuned models of this key's jobs (base models stay)."""
        for _, body in await jobs.all(owner):
            if body.get("fine_tuned_model") == model_id and body["status"] == "succeeded":
                break
        else:
            raise APIError(404, f"The model {model_id!r} is not a fine-tuned model of this key's jobs; only those "
                                "can be deleted.", param="model", code="model_not_found")
        if model_id in models.models:
            await asyncio.to_thread(models.remove, model_id)
        await asyncio.to_thread(shutil.rmtree, tuner.root / body["id"], True)
        body["_deleted"] = True  # not served again after a restart
        _, ev = await jobs.get(body["id"], owner)
        ev.append(_event(body["id"], f"The model {model_id} was deleted."))
        await jobs.put(body, owner, ev)
        return {"id": model_id, "object": "model", "deleted": True}

    @r.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str, owner: str | None = Depends(owner_dep)):
        body, ev = await jobs.get(job_id, owner)
        if body["status"] in FINISHED:
            raise bad_request(f"the job has already {body['status']}", param="job_id")
        await tuner.cancel(job_id)
        if body["status"] == "queued":  # never started: done now (the queue skips it)
            body.update(status="cancelled", finished_at=_now())
            ev.append(_event(job_id, "Fine-tuning job cancelled."))
            await jobs.put(body, owner, ev)
        return _public((await jobs.get(job_id, owner))[0])

    return r
