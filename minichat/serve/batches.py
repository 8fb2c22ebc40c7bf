"""OpenAI's Files and Batch APIs: upload a JSONL of requests, get a file of responses.

    f = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = client.batches.retrieve(b.id)            # validating -> in_progress -> finalizing -> completed
    print(client.files.content(b.output_file_id).text)

Each input line is {"custom_id", "method": "POST", "url": the batch's endpoint, "body": a request}. The batch
is checked as a whole first (JSON, unique custom_ids, the url, no streaming, at most `max_lines`); a bad file
fails the batch with every problem listed by line, as OpenAI does. Then each line is sent to this same app
in-process (an ASGI call, so moderation, validation and errors are exactly the endpoint's), several at a time,
behind the live traffic in the models' queues (a 429 from a full queue is retried). Lines answered 2xx go to
the output file, the others to the error file, in input order: {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}. Cancelling stops sending lines and keeps the answers so far. Files and batches
belong to the API key that made them; they live in the server's store (table `files`, `batches`) or, without
one, in memory. A batch still running when the server stops is run again from its first line at the next start.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, UploadFile
from fastapi.responses import Response

from minichat.serve.kept import MemoryRows
from minichat.serve.protocol import APIError, bad_request
from minichat.serve.responses import page

log = logging.getLogger("minichat.serve")

PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations")
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
INTERNAL_HEADER = "x-minichat-batch-owner"  # with the app's internal token: a line sent on behalf of an owner
WINDOW_S = 24 * 3600


def _now() -> int:
    return int(time.time())


def _not_found(kind: str, oid: str) -> APIError:
    return APIError(404, f"No such {kind}: {oid}", code="not_found")


MEMORY_BYTES = 2**30  # without a store, files are held in memory: at most this many bytes in all


class BatchFiles:
    """Files and batches, per owner: in the server's store, or in memory without one."""

    def __init__(self, store=None, memory_bytes: int = MEMORY_BYTES):
        self.db = store
        self.memory_bytes = memory_bytes
        self._files = MemoryRows()  # (owner, meta, content)
        self._batches = MemoryRows()  # (owner, body)

    async def put_file(self, meta: dict, content: bytes, owner: str | None) -> None:
        if self.db is not None:
            await asyncio.to_thread(self.db.put_file, meta, content, owner)
            return
        held = sum(len(c) for _, _, c in self._files.rows(everyone=True))  # (bytes are not copied)
        if held + len(content) > self.memory_bytes:
            raise APIError(413, f"this server keeps files in memory (it has no store) and holds {held} of its "
                                f"{self.memory_bytes} bytes; delete files or run it with a store",
                           code="file_storage_full")
        self._files.put(meta["id"], owner, meta, content)

    async def get_file(self, file_id: str, owner: str | None, content: bool = False) -> tuple[dict, bytes | None]:
        from minichat.serve.store import NotFound

        if self.db is not None:
            try:
                return await asyncio.to_thread(self.db.get_file, file_id, owner, content)
            except NotFound:
                raise _not_found("file", file_id) from None
        row = self._files.get(file_id, owner)
        if row is None:
            raise _not_found("file", file_id)
        return row[0], (row[1] if content else None)

    async def list_files(self, owner: str | None, purpose: str | None) -> list[dict]:
        if self.db is not None:
            return await asyncio.to_thread(self.db.list_files, owner, purpose)
        return [m for _, m, _ in self._files.rows(owner) if not purpose or m["purpose"] == purpose]

    async def delete_file(self, file_id: str, owner: str | None) -> None:
        await self.get_file(file_id, owner)
        if self.db is not None:
            await asyncio.to_thread(self.db.delete_file, file_id, owner)
        else:
            self._files.pop(file_id)

    async def put_batch(self, body: dict, owner: str | None) -> None:
        if self.db is not None:
            await asyncio.to_thread(self.db.put_batch, body, owner)
        else:
            self._batches.put(body["id"], owner, body)

    async def get_batch(self, batch_id: str, owner: str | None) -> dict:
        from minichat.serve.store import NotFound

        if self.db is not None:
            try:
                return await asyncio.to_thread(self.db.get_batch, batch_id, owner)
            except NotFound:
                raise _not_found("batch", batch_id) from None
        row = self._batches.get(batch_id, owner)
        if row is None:
            raise _not_found("batch", batch_id)
        return row[0]

    async def list_batches(self, owner: str | None = None, everyone: bool = False) -> list[tuple[str | None, dict]]:
        if self.db is not None:
            return await asyncio.to_thread(self.db.list_batches, owner, everyone=everyone)
        return self._batches.rows(owner, everyone)


def parse_lines(content: bytes, endpoint: str | None, max_lines: int) -> tuple[list[dict], list[dict]]:
    """(requests, errors): the input file checked line by line, OpenAI's batch error objects for each problem."""
    errors: list[dict] = []
    out: list[dict] = []
    seen: set[str] = set()

    def err(code: str, message: str, line: int, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        err("invalid_json_line", f"the file is not UTF-8: {e}", 1)
        return [], errors
    lines = [(i, x) for i, x in enumerate(text.splitlines(), 1) if x.strip()]
    if not lines:
        err("empty_file", "the input file has no requests", 1)
    if len(lines) > max_lines:
        err("too_many_requests", f"the file has {len(lines)} requests; this server takes at most {max_lines} per "
                                 "batch", len(lines))
        return [], errors
    for i, raw in lines:
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            err("invalid_json_line", f"line {i} is not valid JSON: {e}", i)
            continue
        if not isinstance(row, dict):
            err("invalid_request", f"line {i} must be a JSON object", i)
            continue
        cid = row.get("custom_id")
        if not isinstance(cid, str) or not cid:
            err("missing_required_parameter", f"line {i} needs a non-empty string custom_id", i, "custom_id")
        elif cid in seen:
            err("duplicate_custom_id", f"custom_id {cid!r} appears more than once", i, "custom_id")
        else:
            seen.add(cid)
        if row.get("method") != "POST":
            err("invalid_method", f"line {i}: method must be POST", i, "method")
        if endpoint is not None and row.get("url") != endpoint:
            err("mismatched_endpoint", f"line {i}: url {row.get('url')!r} is not the batch's endpoint {endpoint}", i,
                "url")
        elif endpoint is None and row.get("url") not in ENDPOINTS:
            err("invalid_url", f"line {i}: url must be one of {', '.join(ENDPOINTS)}", i, "url")
        body = row.get("body")
        if not isinstance(body, dict):
            err("invalid_request", f"line {i}: body must be a JSON object", i, "body")
        elif body.get("stream"):
            err("invalid_request", f"line {i}: stream is not supported in a batch", i, "body.stream")
        out.append({"custom_id": cid, "body": body, "line": i, "url": row.get("url")})
    return out, errors


async def asgi_post(app, path: str, payload: Any, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST a JSON body to an ASGI app in this process: (status, body). The request never disconnects."""
    body = json.dumps(payload).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
             + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("minichat.batch", 80), "state": {}}
    sent = False
    status, chunks = 500, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a batch line is never abandoned by its client
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def answer_line(app, req: dict, url: str, headers: dict[str, str], retry_after: float = 0.2) -> dict:
    """One batch line through the app: OpenAI's output line (a full queue's 429 is waited out and retried)."""
    while True:
        status, raw = await asgi_post(app, url, req["body"], headers)
        if status != 429 or b"at capacity" not in raw:
            break
        await asyncio.sleep(retry_after)  # the queue is full of live traffic: wait
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {"error": {"message": raw[:1000].decode("utf-8", "replace"), "type": "server_error"}}
    rid = payload.get("id") if isinstance(payload, dict) else None
    e = payload.get("error") if isinstance(payload, dict) else None
    e = e if isinstance(e, dict) else {}
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": req["custom_id"],
            "response": {"status_code": status, "request_id": rid or "", "body": payload},
            "error": {"code": e.get("code") or e.get("type"), "message": e.get("message")} if status >= 400 else None}


class BatchRunner:
    """Runs batches in the server's event loop, each line through the app itself."""

    def __init__(self, app, files: BatchFiles, concurrency: int, max_lines: int, retry_after: float = 0.2):
        self.app, self.files, self.concurrency, self.max_lines = app, files, concurrency, max_lines
        self.retry_after = retry_after
        self.token = secrets.token_urlsafe(32)  # lets the runner's in-process calls act for a batch's owner
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: dict[str, int] = {}  # batch id -> when cancel was asked

    def internal_owner(self, request: Request) -> tuple[bool, str | None]:
        """(True, owner) when the request is one of the runner's own calls."""
        if INTERNAL_HEADER not in request.headers:
            return False, None
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {self.token}".encode()):
            return False, None
        owner = request.headers[INTERNAL_HEADER]
        return True, owner or None

    async def resume(self) -> None:
        """At startup: batches a stopped server left unfinished run again (or finish cancelling)."""
        for owner, body in await self.files.list_batches(everyone=True):
            if body["status"] == "cancelling":
                body.update(status="cancelled", cancelled_at=_now())
                await self.files.put_batch(body, owner)
            elif body["status"] in UNFINISHED:
                self.start(body, owner)

    def start(self, body: dict, owner: str | None) -> None:
        self._tasks[body["id"]] = asyncio.get_running_loop().create_task(self._run(body, owner))

    async def stop(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()
        for t in list(self._tasks.values()):
            try:
                await t
            except BaseException:  # noqa: BLE001 - stopping: a batch interrupted here resumes at the next start
                pass
        self._tasks.clear()

    def cancel(self, batch_id: str) -> None:
        self._cancel.setdefault(batch_id, _now())

    def _mark(self, body: dict) -> dict:
        """The body as it should be saved now: "cancelling" once a cancel was asked."""
        if body["id"] in self._cancel and body["status"] == "in_progress":
            body.update(status="cancelling", cancelling_at=self._cancel[body["id"]])
        return body

    async def _run(self, body: dict, owner: str | None) -> None:
        bid = body["id"]
        try:
            _, content = await self.files.get_file(body["input_file_id"], owner, content=True)
            requests, errors = parse_lines(content, body["endpoint"], self.max_lines)
            if errors:
                body.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors[:1000]})
                await self.files.put_batch(body, owner)
                return
            body.update(status="in_progress", in_progress_at=_now(),
                        request_counts={"total": len(requests), "completed": 0, "failed": 0})
            await self.files.put_batch(body, owner)
            results: list[dict | None] = [None] * len(requests)
            sem = asyncio.Semaphore(self.concurrency)
            headers = {"authorization": f"Bearer {self.token}", INTERNAL_HEADER: owner or ""}
            last_save = [time.monotonic()]

            async def one(k: int, req: dict) -> None:
                async with sem:
                    if bid in self._cancel:
                        return
                    results[k] = line = await answer_line(self.app, req, body["endpoint"], headers, self.retry_after)
                body["request_counts"]["completed" if line["error"] is None else "failed"] += 1
                if time.monotonic() - last_save[0] > 1.0:  # progress for retrieve(), about once a second
                    last_save[0] = time.monotonic()
                    await self.files.put_batch(self._mark(body), owner)

            await asyncio.gather(*(one(k, req) for k, req in enumerate(requests)))
            cancelled = bid in self._cancel
            body.update(status="finalizing", finalizing_at=_now())
            await self.files.put_batch(body, owner)
            done = [x for x in results if x is not None]
            for kind, keep in (("output_file_id", lambda x: x["error"] is None), ("error_file_id", lambda x: x["error"] is not None)):
                rows = [x for x in done if keep(x)]
                if rows:
                    meta = await self._write(owner, f"{bid}_{kind.split('_')[0]}.jsonl",
                                             "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows).encode())
                    body[kind] = meta["id"]
            if cancelled:
                body.update(status="cancelled", cancelled_at=_now())
            else:
                body.update(status="completed", completed_at=_now())
            await self.files.put_batch(body, owner)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken batch is reported on the batch, not lost
            log.exception("batch %s failed", bid)
            body.update(status="failed", failed_at=_now(),
                        errors={"object": "list", "data": [{"code": "server_error", "message": str(e), "param": None,
                                                             "line": None}]})
            await self.files.put_batch(body, owner)
        finally:
            self._tasks.pop(bid, None)
            self._cancel.pop(bid, None)

    async def _write(self, owner: str | None, filename: str, content: bytes) -> dict:
        meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content), "created_at": _now(),
                "filename": filename, "purpose": "batch_output", "status": "processed"}
        await self.files.put_file(meta, content, owner)
        return meta


def router(files: BatchFiles, runner: BatchRunner, owner_dep, max_file_bytes: int) -> APIRouter:
    """The /v1/files and /v1/batches endpoints (owner_dep: the server's API-key dependency)."""
    r = APIRouter()

    @r.post("/v1/files")
    async def upload(request: Request, owner: str | None = Depends(owner_dep)):
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - starlette raises its own parse errors
            raise bad_request(f"send the file as multipart/form-data with fields 'file' and 'purpose': {e}") from None
        purpose, up = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES or purpose == "batch_output":
            raise bad_request(f"purpose must be one of {', '.join(p for p in PURPOSES if p != 'batch_output')}",
                              param="purpose")
        if not isinstance(up, UploadFile) and not hasattr(up, "read"):
            raise bad_request("the form needs a file field 'file'", param="file")
        content = await up.read()
        if len(content) > max_file_bytes:
            raise bad_request(f"the file has {len(content)} bytes; this server takes at most {max_file_bytes}",
                              param="file")
        meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(content), "created_at": _now(),
                "filename": (getattr(up, "filename", None) or "upload")[-255:], "purpose": purpose,
                "status": "processed"}
        await files.put_file(meta, content, owner)
        return meta

    @r.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = 10000, after: str | None = None,
                         order: str = "desc", owner: str | None = Depends(owner_dep)):
        return page(await files.list_files(owner, purpose), order, limit, after, max_limit=10_000)

    @r.get("/v1/files/{file_id}")
    async def get_file(file_id: str, owner: str | None = Depends(owner_dep)):
        return (await files.get_file(file_id, owner))[0]

    @r.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, owner: str | None = Depends(owner_dep)):
        _, content = await files.get_file(file_id, owner, content=True)
        return Response(content, media_type="application/octet-stream")

    @r.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, owner: str | None = Depends(owner_dep)):
        await files.delete_file(file_id, owner)
        return {"id": file_id, "object": "file", "deleted": True}

    @r.post("/v1/batches")
    async def create_batch(request: Request, owner: str | None = Depends(owner_dep)):
        from minichat.serve.app import read_json

        b = await read_json(request)
        if not isinstance(b, dict):
            raise bad_request("the request body must be a JSON object")
        if b.get("endpoint") not in ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if b.get("completion_window") != "24h":
            raise bad_request("completion_window must be '24h'", param="completion_window")
        meta = b.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or len(meta) > 16
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            raise bad_request("metadata must be at most 16 string keys and string values", param="metadata")
        fid = b.get("input_file_id")
        if not isinstance(fid, str):
            raise bad_request("input_file_id is required", param="input_file_id")
        f, _ = await files.get_file(fid, owner)
        if f["purpose"] != "batch":
            raise bad_request(f"file {fid} was uploaded with purpose {f['purpose']!r}, not 'batch'",
                              param="input_file_id")
        now = _now()
        body = {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": b["endpoint"], "errors": None,
                "input_file_id": fid, "completion_window": "24h", "status": "validating", "output_file_id": None,
                "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + WINDOW_S,
                "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
                "cancelling_at": None, "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": meta}
        await files.put_batch(body, owner)
        runner.start(dict(body), owner)
        return body

    @r.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None, owner: str | None = Depends(owner_dep)):
        return page([b for _, b in await files.list_batches(owner)], "desc", limit, after)

    @r.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, owner: str | None = Depends(owner_dep)):
        return await files.get_batch(batch_id, owner)

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, owner: str | None = Depends(owner_dep)):
        body = await files.get_batch(batch_id, owner)
        if body["status"] in ("validating", "in_progress"):
            runner.cancel(batch_id)
            body.update(status="cancelling", cancelling_at=_now())
            await files.put_batch(body, owner)  # the runner writes "cancelled" once its lines in flight end
        return body

    return r


def internal_request(request: Request) -> tuple[bool, str | None]:
    """(True, owner) when the request is a batch line the app's runner sent itself."""
    runner: Any = getattr(request.app.state, "batch_runner", None)
    return runner.internal_owner(request) if runner is not None else (False, None)


# ------------------------------------------------------------------------------------------------ offline

def run_offline(app, requests: list[dict], concurrency: int, progress=None) -> list[dict]:
    """Every request through the app in-process, `concurrency` at a time: output lines in input order."""

    async def go() -> list[dict]:
        sem = asyncio.Semaphore(concurrency)
        out: list[dict | None] = [None] * len(requests)

        async def one(k: int, req: dict) -> None:
            async with sem:
                out[k] = await answer_line(app, req, req["url"], {})
            if progress is not None:
                progress(out[k]["error"] is None)

        await asyncio.gather(*(one(k, r) for k, r in enumerate(requests)))
        return out  # type: ignore[return-value]

    return asyncio.run(go())


def main(argv: list[str]) -> int:
    """`minichat batch`: a file of OpenAI batch requests answered offline, without a server."""
    from minichat import config as config_mod
    from minichat.checkpoint import atomic_write_text
    from minichat.errors import MinichatError
    from minichat.serve.app import build_services, create_app
    from minichat.serve.config import ServeConfig

    def extra(ap):
        ap.add_argument("-i", "--input", required=True, help="JSONL of {custom_id, method, url, body} requests")
        ap.add_argument("-o", "--output", required=True, help="JSONL of results, in input order")
        ap.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="a model the requests may name (repeatable; default: the built-in smollm2)")
        ap.add_argument("--no-moderation", action="store_true", help="turn moderation off")
        ap.add_argument("--quiet", action="store_true", help="no progress bar")

    cfg, ns = config_mod.build(ServeConfig, argv, prog="minichat batch", extra=extra, description=(
        "Answer a file of OpenAI Batch API requests (chat completions, completions, embeddings, responses, "
        "moderations; each line's url says which) without starting a server, as `minichat serve` would answer "
        "them: the same moderation, validation and errors. Results go to --output in OpenAI's batch output format."))
    cfg.store_url, cfg.web, cfg.metrics = "none", False, False
    if ns.model:
        cfg.models = ns.model
    if ns.no_moderation:
        cfg.moderation = False
    cfg.validate()
    try:
        content = Path(ns.input).expanduser().read_bytes()
    except OSError as e:
        raise MinichatError(f"cannot read --input {ns.input}: {e}") from None
    requests, errors = parse_lines(content, None, cfg.batch_max_lines)
    if errors:
        listed = "\n  ".join(e["message"] for e in errors[:20])
        raise MinichatError(f"{ns.input}: {len(errors)} problem(s), nothing was run:\n  {listed}")
    models, _, moderator = build_services(cfg)
    app = create_app(cfg, models, None, moderator)
    bar = None
    if not ns.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="batch", dynamic_ncols=True)
    counts = {"ok": 0, "failed": 0}

    def progress(ok: bool) -> None:
        counts["ok" if ok else "failed"] += 1
        if bar is not None:
            bar.update(1)

    t0 = time.perf_counter()
    models.start()
    try:
        # no live traffic to leave room for: every row of the batch
        out = run_offline(app, requests, cfg.batch_concurrency or cfg.engine.max_batch, progress)
    finally:
        models.stop()
        if bar is not None:
            bar.close()
        if hasattr(moderator, "close"):
            moderator.close()
    atomic_write_text(ns.output, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in out))
    print(f"wrote {ns.output}: {counts['ok']} answered, {counts['failed']} failed, in {time.perf_counter() - t0:.1f} s")
    return 0
