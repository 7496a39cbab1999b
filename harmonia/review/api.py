"""The review service's HTTP side: a JSON API (OpenAPI docs at /docs) and the review page at /."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import psycopg
import swagger_ui_bundle  # type: ignore[import-untyped]  # it ships no type hints
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from harmonia import __version__
from harmonia.config import Settings
from harmonia.domain import SourceTerm
from harmonia.export import export_csv
from harmonia.review import service as svc
from harmonia.review.auth import bearer, current_user, writer
from harmonia.review.guard import Guard, docs_page
from harmonia.store import concepts as concept_store
from harmonia.store import mapping as map_store
from harmonia.store import review as store
from harmonia.store import users as user_store
from harmonia.store.queue import enqueue as enqueue_terms

WEB = pathlib.Path(__file__).resolve().parent / "web"
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1

User = Annotated[user_store.User, Depends(current_user)]
Writer = Annotated[user_store.User, Depends(writer)]
ItemId = Annotated[int, Path(ge=1, le=INT8_MAX, description="A review item's id.")]
MapId = Annotated[int, Path(ge=1, le=INT8_MAX, description="A concept map row's id.")]
ConceptId = Annotated[int, Field(ge=0, le=INT4_MAX, description="An OMOP concept_id (0: no matching concept).")]


Version = Annotated[int, Field(ge=0, le=INT4_MAX, description="The map's version the decision was made on "
                                                                "(the item's `version`; 0: the code had no map).")]
RequestId = Annotated[str | None, Field(None, min_length=1, max_length=100, description=(
    "A client id for this decision: sending it again does nothing (a repeated key press, a retry)."))]
Note = Annotated[str | None, Field(None, max_length=2000, description="Why (kept in the history).")]
Comment = Annotated[str | None, Field(None, max_length=4000, description="The code's comment (Usagi's).")]
EquivalenceIn = Literal["EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED", "UNREVIEWED"]


class DecisionIn(BaseModel):
    version: Version
    note: Note = None
    comment: Comment = None
    request_id: RequestId = None


class ApproveIn(DecisionIn):
    rank: int | None = Field(None, ge=1, le=50, description="Which suggestion, 1 = the model's top-1.")
    concept_id: ConceptId | None = Field(None, description="Or the suggested concept's id (both: they must agree).")
    equivalence: EquivalenceIn | None = Field(None, description="Default EQUAL.")
    confirm: bool = Field(False, description="Map outside the source's expected domains anyway.")


class ChooseIn(DecisionIn):
    concept_id: ConceptId
    equivalence: EquivalenceIn | None = None
    confirm: bool = False


class TargetIn(BaseModel):
    concept_id: ConceptId
    mapping_type: Literal["MAPS_TO", "MAPS_TO_VALUE", "MAPS_TO_UNIT"] = "MAPS_TO"
    equivalence: EquivalenceIn = "EQUAL"


class TargetsIn(DecisionIn):
    targets: list[TargetIn] = Field(min_length=1, max_length=20)
    confirm: bool = False


class NoteIn(BaseModel):
    note: Note = None


class RevokeIn(NoteIn):
    version: Version


class ClaimIn(BaseModel):
    n: int = Field(20, ge=1, le=500, description="How many items to claim.")
    source_vocab: str | None = Field(None, max_length=200)
    ttl_s: float | None = Field(None, gt=0, le=86400, description="Claim lifetime (default: review_claim_ttl_s).")


class AssignIn(BaseModel):
    item_ids: list[Annotated[int, Field(ge=1, le=INT8_MAX)]] = Field(min_length=1, max_length=10000)
    reviewer: str | None = Field(None, max_length=200, description="A user's name; null: unassign.")


class TermIn(BaseModel):
    source_code: str = Field(min_length=1, max_length=1000)
    source_vocab: str = Field(min_length=1, max_length=200)
    source_text: str = Field(min_length=1, max_length=10000)
    source_frequency: int | None = Field(None, ge=0, le=INT4_MAX)
    extra: dict[str, Any] = Field(default_factory=dict)


class EnqueueIn(BaseModel):
    terms: list[TermIn] = Field(min_length=1, max_length=10000)


def create_app(settings: Settings) -> FastAPI:
    service = svc.ReviewService.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.open()
        await service.aopen()
        try:
            yield
        finally:
            await service.aclose()
            service.close()

    app = FastAPI(title="Harmonia review service", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Review the router's uncertain suggestions, correct the concept map, export it. "
                              "Every /api route needs `Authorization: Bearer <token>` (`harmonia user add NAME`); "
                              "writes need role reviewer or admin.")
    app.state.service = service
    app.add_middleware(Guard, max_body_bytes=settings.review.max_body_bytes)
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    templates = Jinja2Templates(directory=WEB / "templates")

    @app.exception_handler(svc.ReviewError)
    async def _review_error(request: Request, exc: svc.ReviewError) -> JSONResponse:
        return JSONResponse(jsonable_encoder(exc.body()), status_code=exc.status)

    @app.exception_handler(psycopg.errors.IntegrityError)
    async def _integrity(request: Request, exc: psycopg.errors.IntegrityError) -> JSONResponse:
        # The schema's constraints are the last line; a violation is the caller's input, not a server fault.
        return JSONResponse({"detail": f"rejected by the database: {exc.diag.message_primary or exc}"},
                            status_code=422)

    @app.exception_handler(psycopg.errors.DataError)
    async def _data_error(request: Request, exc: psycopg.errors.DataError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid value: {exc.diag.message_primary or exc}"}, status_code=422)

    # ------------------------------------------------------------------------------------------------ page

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi_url or "/openapi.json", app.title))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "review.html", {"version": __version__})

    # ------------------------------------------------------------------------------------------------ me

    @app.post("/api/session", tags=["auth"],
              summary="Trade an API token for a session token that expires (the review page logs in with it)")
    def session(user: User) -> dict[str, Any]:
        ttl = settings.review.session_ttl_s
        with service.connection() as conn:
            token = user_store.issue_token(conn, user["id"], kind="session", ttl_s=ttl)
        return {"token": token, "expires_in_s": ttl, "name": user["name"], "role": user["role"]}

    @app.post("/api/logout", tags=["auth"], summary="Revoke the token this request carries")
    def logout(user: User, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> dict[str, Any]:
        assert creds is not None  # current_user refused a request without one
        with service.connection() as conn:
            return {"revoked": user_store.revoke_token(conn, creds.credentials)}

    @app.get("/api/me", tags=["auth"], summary="The user the token belongs to")
    def me(user: User) -> dict[str, Any]:
        return {"id": user["id"], "name": user["name"], "role": user["role"],
                "can_write": user["role"] in ("reviewer", "admin")}

    # ------------------------------------------------------------------------------------------------ review

    @app.get("/api/review/items", tags=["review"],
             summary="List review items (paginated; most frequent first by default)")
    def list_items(
        user: User,
        status: Annotated[list[Literal["open", "flagged", "resolved"]] | None,
                          Query(description="Repeatable; default open and flagged.")] = None,
        source_vocab: str | None = None,
        domain: Annotated[str | None, Query(description="Domain of the top candidate.")] = None,
        min_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
        max_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
        order: Literal["frequency", "oldest", "confidence"] = "frequency",
        available: Annotated[bool, Query(description="Leave out items another reviewer claimed or was "
                                                     "assigned.")] = False,
        mine: Annotated[bool, Query(description="Only my live claims and assignments.")] = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        with service.connection() as conn:
            total, items = store.list_items(conn, statuses=status or ["open", "flagged"], source_vocab=source_vocab,
                                            domain=domain, min_confidence=min_confidence,
                                            max_confidence=max_confidence, limit=limit, offset=offset, order=order,
                                            viewer_id=user["id"], others_claims=not available, mine=mine)
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @app.get("/api/review/facets", tags=["review"], summary="Source vocabularies and domains in the queue")
    def facets(user: User) -> dict[str, list[str]]:
        with service.connection() as conn:
            return store.item_facets(conn)

    @app.get("/api/review/progress", tags=["review"], summary="Decided / total review items per source set")
    def progress(user: User) -> dict[str, Any]:
        with service.connection() as conn:
            sets = store.progress(conn)
        return {"sets": sets, "total": sum(p["total"] for p in sets), "decided": sum(p["decided"] for p in sets)}

    @app.post("/api/review/claim", tags=["review"],
              summary="Claim the next open items nobody else holds (the claim expires)")
    def claim(body: ClaimIn, user: Writer) -> dict[str, Any]:
        ttl = body.ttl_s or settings.review.claim_ttl_s
        with service.connection() as conn, conn.transaction():
            ids = store.claim(conn, user["id"], body.n, ttl, source_vocab=body.source_vocab)
        return {"item_ids": ids, "ttl_s": ttl}

    @app.post("/api/review/release", tags=["review"], summary="Give back all my claims")
    def release(user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return {"released": store.release_claims(conn, user["id"])}

    @app.post("/api/review/assign", tags=["review"], summary="Assign items to a reviewer (admin)")
    def assign(body: AssignIn, user: Writer) -> dict[str, Any]:
        if user["role"] != "admin":
            raise HTTPException(403, "assigning needs role admin")
        with service.connection() as conn:
            target = None
            if body.reviewer is not None:
                found = user_store.user_by_name(conn, body.reviewer)
                if found is None:
                    raise HTTPException(422, f"no user named {body.reviewer!r}")
                target = found["id"]
            return {"assigned": store.assign(conn, body.item_ids, target)}

    @app.get("/api/review/items/{item_id}", tags=["review"],
             summary="One item: source details, top-5 with scores and rationales, current map and version, history")
    def show_item(item_id: ItemId, user: User) -> dict[str, Any]:
        with service.connection() as conn, conn.pipeline(), conn.transaction():  # one round trip, then the commit
            store.consistent_reads(conn)  # the item's status and its map's version from one moment
            return svc.item_detail(conn, item_id)

    @app.post("/api/review/items/{item_id}/approve", tags=["review"],
              summary="Approve one of the item's suggestions (by rank and/or concept_id)",
              responses={409: {"description": "Stale version (with the current state) or a domain to confirm"}})
    def approve(item_id: ItemId, body: ApproveIn, user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.decide(conn, item_id, user["id"], "approve", concept_id=body.concept_id, rank=body.rank,
                              note=body.note, version=body.version, equivalence=body.equivalence,
                              comment=body.comment, confirm=body.confirm, request_id=body.request_id)

    @app.post("/api/review/items/{item_id}/choose", tags=["review"],
              summary="Map the code to another concept (e.g. found with concept search)")
    def choose(item_id: ItemId, body: ChooseIn, user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.decide(conn, item_id, user["id"], "choose", concept_id=body.concept_id, note=body.note,
                              version=body.version, equivalence=body.equivalence, comment=body.comment,
                              confirm=body.confirm, request_id=body.request_id)

    @app.post("/api/review/items/{item_id}/targets", tags=["review"],
              summary="Give the code its targets: several MAPS_TO, MAPS_TO_VALUE, MAPS_TO_UNIT, each with an "
                      "equivalence")
    def set_targets(item_id: ItemId, body: TargetsIn, user: Writer) -> dict[str, Any]:
        targets = [map_store.Target(t.concept_id, t.mapping_type, t.equivalence) for t in body.targets]
        with service.connection() as conn:
            return svc.decide(conn, item_id, user["id"], "targets", targets=targets, note=body.note,
                              version=body.version, comment=body.comment, confirm=body.confirm,
                              request_id=body.request_id)

    @app.post("/api/review/items/{item_id}/no-match", tags=["review"],
              summary="No concept fits: no targets, equivalence UNMATCHED")
    def no_match(item_id: ItemId, body: DecisionIn, user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.decide(conn, item_id, user["id"], "no_match", note=body.note, version=body.version,
                              comment=body.comment, request_id=body.request_id)

    @app.post("/api/review/items/{item_id}/ignore", tags=["review"],
              summary="Leave the code unmapped on purpose (status IGNORED)")
    def ignore(item_id: ItemId, body: DecisionIn, user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.decide(conn, item_id, user["id"], "ignore", note=body.note, version=body.version,
                              comment=body.comment, request_id=body.request_id)

    @app.post("/api/review/items/{item_id}/flag", tags=["review"],
              summary="Flag for a second look (an approved code leaves the approved set and the exports)")
    def flag(item_id: ItemId, body: DecisionIn, user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.decide(conn, item_id, user["id"], "flag", note=body.note, version=body.version,
                              comment=body.comment, request_id=body.request_id)

    @app.post("/api/review/undo", tags=["review"], summary="Undo my last decision (if nobody changed the code since)")
    def undo(user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.undo(conn, user["id"])

    # ------------------------------------------------------------------------------------------------ calibration

    @app.get("/api/calibration", tags=["calibration"],
             summary="A source set's calibration from reviews: its sample's progress and its threshold")
    def calibration(user: User, source_vocab: Annotated[str, Query(min_length=1, max_length=200)]
                    ) -> dict[str, Any]:
        from harmonia.pipeline.review_calibration import progress

        with service.connection() as conn:
            return progress(conn, source_vocab, target=settings.benchmark.target_precision).to_dict()

    # ------------------------------------------------------------------------------------------------ concepts

    @app.get("/api/concepts/search", tags=["concepts"], summary="Search standard concepts (the retriever)")
    def search(
        user: User,
        q: Annotated[str, Query(min_length=1, max_length=1000)],
        k: Annotated[int, Query(ge=1, le=100)] = 20,
        domain: Annotated[list[str] | None, Query()] = None,
        vocabulary: Annotated[list[str] | None, Query()] = None,
    ) -> dict[str, Any]:
        results = []
        if q.strip().isascii() and q.strip().isdigit() and int(q) <= INT4_MAX:  # a concept id typed in (not "²")
            with service.connection() as conn:
                results = [c.to_dict() for c in concept_store.get_concepts(conn, [int(q)]).values()]
        try:
            results += service.search(q, k, domains=domain, vocabularies=vocabulary)
        except Exception as exc:  # e.g. no embeddings yet: say so (503), do not 500
            if not results:
                raise HTTPException(503, f"concept search unavailable: {exc}") from exc
        return {"query": q, "results": results}

    @app.get("/api/concepts/{concept_id}", tags=["concepts"], summary="One concept")
    def concept(concept_id: Annotated[int, Path(ge=0, le=INT4_MAX)], user: User) -> dict[str, Any]:
        with service.connection() as conn:
            found = concept_store.get_concepts(conn, [concept_id]).get(concept_id)
        if found is None:
            raise HTTPException(404, f"concept_id {concept_id} does not exist")
        return found.to_dict()

    # ------------------------------------------------------------------------------------------------ maps

    @app.get("/api/maps", tags=["maps"], summary="List maps (paginated; default the approved ones)")
    def list_maps(
        user: User,
        source_vocab: str | None = None,
        decided_by: Literal["auto", "reviewer", "import"] | None = None,
        status: Annotated[list[Literal["UNCHECKED", "APPROVED", "FLAGGED", "IGNORED", "INVALID_TARGET"]] | None,
                          Query(description="Repeatable; default APPROVED.")] = None,
        q: Annotated[str | None, Query(max_length=1000,
                                       description="Substring of code, source text or a target's name.")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        with service.connection() as conn:
            total, ids = store.list_maps(conn, source_vocab=source_vocab, decided_by=decided_by,
                                         statuses=status or ["APPROVED"], search=q, limit=limit, offset=offset)
            maps = [m.to_dict() for m in map_store.states_by_ids(conn, ids)]
        return {"total": total, "limit": limit, "offset": offset, "items": maps}

    @app.get("/api/maps/{map_id}", tags=["maps"], summary="One map with its targets and history")
    def show_map(map_id: MapId, user: User) -> dict[str, Any]:
        with service.connection() as conn:
            m = map_store.get_state(conn, map_id=map_id)
            if m is None:
                raise HTTPException(404, f"concept map {map_id} not found")
            return {**m.to_dict(), "history": map_store.history(conn, m.source_code, m.source_vocab)}

    @app.post("/api/maps/{map_id}/revoke", tags=["maps"], summary="Revoke a map (its item reopens)")
    def revoke(map_id: MapId, body: RevokeIn, user: Writer) -> dict[str, Any]:
        with service.connection() as conn:
            return svc.revoke(conn, map_id, user["id"], note=body.note, version=body.version)

    @app.get("/api/history", tags=["maps"], summary="Every change to one code's map")
    def history(source_code: str, source_vocab: str, user: User) -> list[dict[str, Any]]:
        with service.connection() as conn:
            return [dict(h) for h in map_store.history(conn, source_code, source_vocab)]

    @app.get("/api/export/{fmt}", tags=["maps"], summary="Approved maps as Usagi CSV or SOURCE_TO_CONCEPT_MAP",
             response_class=Response, responses={200: {"content": {"text/csv": {}}}})
    def export(fmt: Literal["usagi", "stcm"], user: User, source_vocab: str | None = None,
               status: Annotated[list[Literal["UNCHECKED", "APPROVED", "FLAGGED", "IGNORED", "INVALID_TARGET", "all"]]
                                 | None, Query(description="Usagi: repeatable, default APPROVED; all: a full save "
                                                           "file. STCM: always APPROVED.")] = None) -> Response:
        statuses: list[Any] | None = [x for x in status or ["APPROVED"]]
        if statuses and "all" in statuses:
            statuses = None
        with service.connection() as conn:
            text = export_csv(conn, fmt, source_vocab, statuses)
        name = "usagi.csv" if fmt == "usagi" else "source_to_concept_map.csv"
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    # ------------------------------------------------------------------------------------------------ queue

    @app.post("/api/source-queue", tags=["queue"], summary="Enqueue source codes for mapping (duplicates skipped)")
    def enqueue(body: EnqueueIn, user: Writer) -> dict[str, Any]:

        terms = [SourceTerm(source_code=t.source_code, source_vocab=t.source_vocab, source_text=t.source_text,
                            source_frequency=t.source_frequency, extra=t.extra) for t in body.terms]
        with service.connection() as conn:
            counts = enqueue_terms(conn, terms)
        return {"new": counts.new, "duplicate": counts.duplicate, "ids": counts.ids}

    return app
