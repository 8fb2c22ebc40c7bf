"""The labeling app over HTTP: the page at /label/ and its JSON API under /label/api.

    POST  /label/api/login                        {name, secret} -> {token, user}; send "Authorization: Bearer token"
    POST  /label/api/logout
    GET   /label/api/me                           the user, their projects, categories, rating flags
    POST  /label/api/projects/{project}/next      {kind?} -> the open assignment (work in progress) or a new one
    GET   /label/api/assignments                  ?project=&status=&user= (user: admins only) -> recent work
    GET   /label/api/assignments/{id}
    PUT   /label/api/assignments/{id}/draft       {draft: {...}}: unfinished work, saved as it is done
    POST  /label/api/assignments/{id}/demonstration  {content}
    POST  /label/api/assignments/{id}/ranking     {ranking: [[id], [id, id], ...] best first, ties grouped,
                                                  none_acceptable?, comment?}
    POST  /label/api/assignments/{id}/rating      {ratings: [{answer_id, likert: 1..7, flags: {...}, comment?}]}
    POST  /label/api/assignments/{id}/skip        {reason?}
    GET   /label/api/dashboard                    ?project= progress, per labeler, agreement (labelers: their own)
    GET   /label/api/users, PATCH /label/api/users/{name} {held_out?, role?, active?}   admins only

Mounted by `minichat serve` (mount()) when it has a store, or served alone by `minichat label serve`
(create_app()). Errors use the server's {"error": {"message", ...}} body: 400 bad input, 401 not logged in,
403 another labeler's work or admin-only, 404 unknown ids.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from minichat.label.models import CATEGORIES, FLAGS, TASK_KINDS
from minichat.label.service import Forbidden, Labeling, Unauthorized
from minichat.serve.protocol import APIError, parse

STATIC = Path(__file__).with_name("static")
SERVE_STATIC = Path(__file__).parent.parent / "serve" / "static"
router = APIRouter(prefix="/label")


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=100)
    secret: str = Field(max_length=500)


class NextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str | None = None


class DraftBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    draft: dict | None = None


class DemoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(max_length=100_000)


class RankingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ranking: list[Any] | None = None  # validated by the service, which names the problem
    none_acceptable: bool = False
    comment: str | None = Field(default=None, max_length=10_000)


class RatingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratings: list[Any]


class SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=10_000)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    held_out: bool | None = None
    role: str | None = None
    active: bool | None = None


def labeling(request: Request) -> Labeling:
    return request.app.state.labeling


async def _call(fn, *args, **kwargs):
    """Run a (blocking) service call in a thread; its permission errors become 401/403."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except Unauthorized as e:
        raise APIError(401, str(e), code="unauthorized") from None
    except Forbidden as e:
        raise APIError(403, str(e), code="forbidden") from None


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


async def current_user(request: Request, lab: Labeling = Depends(labeling)) -> dict:
    return await _call(lab.authenticate, _token(request))


def _admin(user: dict) -> None:
    if user["role"] != "admin":
        raise APIError(403, "only an admin can do this", code="forbidden")


async def _body(request: Request, model):
    from minichat.serve.app import read_json

    return parse(model, await read_json(request))


@router.get("", include_in_schema=False)
async def page_redirect():
    return RedirectResponse("/label/")


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/markdown.js", include_in_schema=False)
async def markdown_js():
    # the chat page's safe Markdown renderer, shared rather than copied
    return FileResponse(SERVE_STATIC / "markdown.js", media_type="text/javascript")


@router.post("/api/login")
async def login(request: Request, lab: Labeling = Depends(labeling)):
    b: LoginBody = await _body(request, LoginBody)
    token, user = await _call(lab.login, b.name, b.secret)
    return {"token": token, "user": user}


@router.post("/api/logout")
async def logout(request: Request, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    await _call(lab.logout, _token(request))
    return {"ok": True}


@router.get("/api/me")
async def me(lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    projects = await _call(lab.projects, user)
    return {"user": user, "projects": projects, "kinds": list(TASK_KINDS), "categories": list(CATEGORIES),
            "flags": list(FLAGS)}


@router.post("/api/projects/{project}/next")
async def next_task(project: str, request: Request, lab: Labeling = Depends(labeling),
                    user: dict = Depends(current_user)):
    kind = (await _body(request, NextBody)).kind if (await request.body()).strip() else None
    a = await _call(lab.next_assignment, user, project, kind)
    return {"assignment": a}


@router.get("/api/assignments")
async def list_assignments(project: str | None = None, status: str | None = None, user_name: str | None = None,
                           limit: int = 50, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    if not 1 <= limit <= 500:
        raise APIError(400, "limit must be 1..500", param="limit")
    data = await _call(lab.assignments, user, project=project, status=status, of_user=user_name, limit=limit)
    return {"object": "list", "data": data}


@router.get("/api/assignments/{aid}")
async def get_assignment(aid: int, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    return await _call(lab.assignment, user, aid)


@router.put("/api/assignments/{aid}/draft")
async def save_draft(aid: int, request: Request, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    b: DraftBody = await _body(request, DraftBody)
    return await _call(lab.save_draft, user, aid, b.draft)


@router.post("/api/assignments/{aid}/demonstration")
async def demonstration(aid: int, request: Request, lab: Labeling = Depends(labeling),
                        user: dict = Depends(current_user)):
    b: DemoBody = await _body(request, DemoBody)
    return await _call(lab.submit_demonstration, user, aid, b.content)


@router.post("/api/assignments/{aid}/ranking")
async def ranking(aid: int, request: Request, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    b: RankingBody = await _body(request, RankingBody)
    return await _call(lab.submit_ranking, user, aid, b.ranking, none_acceptable=b.none_acceptable, comment=b.comment)


@router.post("/api/assignments/{aid}/rating")
async def rating(aid: int, request: Request, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    b: RatingBody = await _body(request, RatingBody)
    return await _call(lab.submit_rating, user, aid, b.ratings)


@router.post("/api/assignments/{aid}/skip")
async def skip(aid: int, request: Request, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    b = await _body(request, SkipBody) if (await request.body()).strip() else SkipBody()
    return await _call(lab.skip, user, aid, b.reason)


@router.get("/api/dashboard")
async def dashboard(project: str | None = None, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    return await _call(lab.dashboard, user, project)


@router.get("/api/users")
async def users(lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    _admin(user)
    return {"object": "list", "data": await _call(lab.users)}


@router.patch("/api/users/{name}")
async def patch_user(name: str, request: Request, lab: Labeling = Depends(labeling), user: dict = Depends(current_user)):
    _admin(user)
    b: UserPatch = await _body(request, UserPatch)
    return await _call(lab.update_user, name, role=b.role, held_out=b.held_out, active=b.active)


def mount(app: FastAPI, store, session_hours: float = 14 * 24) -> Labeling:
    """Add the labeling app to a FastAPI app that has the serving store (creating its tables if needed)."""
    lab = Labeling(store, session_hours=session_hours)
    app.state.labeling = lab
    app.include_router(router)
    app.mount("/label/static", StaticFiles(directory=STATIC), name="label-static")
    return lab


def create_app(store, session_hours: float = 14 * 24) -> FastAPI:
    """The labeling app alone (`minichat label serve`): no models loaded."""
    import logging

    from minichat.serve.protocol import install_error_handlers

    app = FastAPI(title="minichat label", docs_url="/docs", redoc_url=None)
    install_error_handlers(app, logging.getLogger("minichat.label"))

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/label/")

    @app.get("/health")
    async def health():
        return {"status": "ok", "labeling": True}

    mount(app, store, session_hours)
    return app
