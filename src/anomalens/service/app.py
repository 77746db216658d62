# ruff: noqa: B008  (FastAPI declares parameters with Form()/File()/Query()/Depends() defaults)
"""The FastAPI application: profiles, inspection, jobs, history, CSV export and the web page.

Build it with ``create_app(ServiceSettings(...))``; ``anomalens serve`` runs it with uvicorn.
Every error is JSON ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    Query,
    Request,
    Security,
    UploadFile,
)
from fastapi import (
    Path as PathParam,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomalens import __version__
from anomalens.data.io import ImageReadError, load_image
from anomalens.fileio import atomic_save_png
from anomalens.registry import get_detector_class, list_detectors
from anomalens.service.engine import InspectionEngine
from anomalens.service.errors import ServiceError
from anomalens.service.jobs import JobManager
from anomalens.service.profiles import Profile, ProfileStore, ThresholdPolicy
from anomalens.service.schemas import (
    ErrorOut,
    HealthOut,
    HistoryPage,
    InspectionOut,
    InspectOut,
    JobOut,
    MethodOut,
    ProfileOut,
    record_to_out,
)
from anomalens.service.settings import ServiceSettings
from anomalens.service.store import HistoryFilter, JobRow, ResultStore, utc_naive
from anomalens.service.uploads import (
    DecodedImage,
    PixelGate,
    clean_file_name,
    decode_image,
    kept_pixels,
    peek_pixels,
)

__all__ = ["CLIENT_HEADER", "create_app"]

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422)
}
#: Without a token, every ``/api`` call (but ``/api/health``) must carry this header. A web page
#: of another origin cannot add it without a CORS preflight, which this server never grants,
#: so cross-site requests cannot reach the API. The service's own page sends it.
CLIENT_HEADER = "X-Anomalens-Client"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: Largest id / offset accepted (SQL integers are signed 64-bit).
_MAX_SQL_INT = 2**63 - 1


class ArtifactKind(str, Enum):
    image = "image"
    overlay = "overlay"
    heatmap = "heatmap"
    mask = "mask"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.jobs.shutdown()
    app.state.store.close()


# ----------------------------------------------------------------------------- middleware
class BodyLimitMiddleware:
    """Answers 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    def _message(self) -> str:
        return (
            f"request body exceeds the upload limit of {self.limit / 1048576:.1f} MiB "
            "(server setting ANOMALENS_MAX_UPLOAD_MB); send fewer or smaller images per request"
        )

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = json.dumps({"error": "too_large", "message": self._message()}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # an HTTPException passes through FastAPI's body parsing unchanged
                    raise StarletteHTTPException(413, detail=self._message())
            return msg

        await self.app(scope, limited, send)


def _same_origin(origin: str, host: str, settings: ServiceSettings) -> bool:
    """``Origin`` names this server: the ``Host`` the request came to, or (behind a reverse
    proxy that rewrites ``Host``) a name listed in ``allowed_hosts``."""
    parts = urlsplit(origin)
    if parts.netloc.lower() == host.lower():
        return True
    name = (parts.hostname or "").lower()
    return bool(name) and name in settings.allowed_hosts


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = {"error": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _redactor(data_dir: Path) -> Callable[[str], str]:
    """Hides the server's absolute folders (data, weight cache, home) in client messages."""
    from anomalens.backbones.weights import cache_dir

    folders = []
    for label, folder in (
        ("<weight cache>", cache_dir()),
        ("<data dir>", data_dir),
        ("~", Path.home()),
    ):
        for form in {str(folder), str(folder.expanduser().resolve())}:
            if len(form) > 1:
                folders.append((form, label))
    folders.sort(key=lambda f: -len(f[0]))  # the longest first: a cache inside home

    def redact(message: str) -> str:
        for form, label in folders:
            message = message.replace(form, label)
        return message

    return redact


def _install_error_handlers(app: FastAPI) -> None:
    redact = app.state.redact

    @app.exception_handler(ServiceError)
    async def _service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return _error(exc.status, exc.code, redact(exc.message))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = "no such URL; the API is under /api (see /docs)"
        return _error(exc.status_code, code, redact(msg))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
            fields.append({"field": loc, "message": e.get("msg", "")})
            parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
        return _error(
            422, "invalid_request", redact("; ".join(parts)) or "invalid request", fields=fields
        )

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(
            500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
        )


# ----------------------------------------------------------------------------- auth
_bearer = HTTPBearer(auto_error=False, description="the server's access token")
_x_token = APIKeyHeader(name="X-Token", auto_error=False, description="the server's access token")


def require_token(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
    x_token: str | None = Security(_x_token),
) -> None:
    """Checks ``Authorization: Bearer <token>`` or ``X-Token: <token>`` when a token is set."""
    expected: str | None = request.app.state.settings.token
    if not expected:
        if not request.headers.get(CLIENT_HEADER):
            raise ServiceError(
                403,
                "cross_site",
                f"API calls need the header '{CLIENT_HEADER}: 1' (or the server's token); it "
                "keeps web pages of other sites from using this service through your browser",
            )
        return
    given = bearer.credentials if bearer is not None else x_token
    if given is None:
        raise ServiceError(
            401,
            "unauthorized",
            "this server needs an access token: send 'Authorization: Bearer <token>'",
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ServiceError(401, "unauthorized", "wrong access token")


# ----------------------------------------------------------------------------- helpers
def _profile_out(p: Profile) -> ProfileOut:
    return ProfileOut(
        name=p.name,
        uid=p.uid,
        method=p.method,
        options=p.options,
        learning_type=p.learning_type,
        num_normals=len(p.normals),
        normal_names=p.normal_names,
        threshold=p.threshold,
        policy=p.policy,
        created_at=p.created_at,
        detector_config=p.detector_config,
    )


@contextmanager
def _read_uploads(
    files: list[UploadFile], settings: ServiceSettings, gate: PixelGate
) -> Iterator[tuple[list[DecodedImage], list[dict[str, str]]]]:
    """Decode a request's uploads within the per-image, per-request and in-flight budgets.

    Every header is read first: a request whose images would decode (after reduction to
    ``settings.working_size``) to more than ``settings.max_request_pixels`` is refused before
    any pixel is decoded. The request then holds its pixels in ``gate`` (its largest image
    while decoding, or all it keeps, whichever is more) until the ``with`` block ends, so
    the decoded images of all requests in flight stay within ``settings.decode_pixels``.
    """
    if len(files) > settings.max_files:
        raise ServiceError(
            413,
            "too_many_files",
            f"{len(files)} files in one request; the limit is {settings.max_files}",
        )
    bad: list[dict[str, str]] = []
    accepted: list[tuple[bytes, str | None]] = []
    total = largest = 0
    for f in files:
        data = f.file.read()
        try:
            w, h = peek_pixels(data, f.filename)
        except ServiceError as exc:
            bad.append({"file_name": clean_file_name(f.filename), "message": exc.message})
            continue
        total += kept_pixels(w, h, settings.working_size)
        largest = max(largest, w * h)
        accepted.append((data, f.filename))
    if total > settings.max_request_pixels:
        raise ServiceError(
            413,
            "too_many_pixels",
            f"the images of this request decode to {total} pixels (after reduction to "
            f"{settings.working_size} px); the limit per request is "
            f"{settings.max_request_pixels} (ANOMALENS_MAX_REQUEST_PIXELS): send fewer or "
            "smaller images per request",
        )
    with gate.hold(max(largest, total)):
        good = []
        for data, name in accepted:
            try:
                good.append(decode_image(data, name, working_size=settings.working_size))
            except ServiceError as exc:
                bad.append({"file_name": clean_file_name(name), "message": exc.message})
        del accepted
        yield good, bad


def _require_some(good: list[DecodedImage], bad: list[dict[str, str]]) -> None:
    if not good:
        if len(bad) == 1:
            raise ServiceError(400, "bad_image", bad[0]["message"])
        msgs = "; ".join(b["message"] for b in bad[:5])
        raise ServiceError(
            400, "bad_image", f"none of the {len(bad)} uploads is a readable image: {msgs}"
        )


def _job_out(job: JobRow, store: ResultStore, redact: Callable[[str], str] = lambda m: m) -> JobOut:
    return JobOut(
        id=job.id,
        profile=job.profile,
        status=job.status,
        total=job.total,
        done=job.done,
        results=[record_to_out(r) for r in store.job_results(job.id)],
        errors=job.errors,  # type: ignore[arg-type]
        message=redact(job.message) if job.message else job.message,
        created_at=job.created_at,
        finished_at=job.finished_at,
        links={"self": f"/api/jobs/{job.id}"},
    )


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not key.isascii() or not key.isprintable():
        raise ServiceError(
            422, "invalid_request", "Idempotency-Key must be 1-200 printable ASCII characters"
        )
    return key


def _stored_image_path(data_dir: Path, sha256: str) -> Path:
    """Where the engine keeps an inspected image (content-addressed, re-encoded PNG)."""
    return data_dir / "images" / sha256[:2] / f"{sha256}.png"


def _epoch(t: datetime) -> float:
    return (t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)).timestamp()


def _parse_options(options: str | None) -> dict[str, Any]:
    if not options:
        return {}
    try:
        value = json.loads(options)
    except json.JSONDecodeError as exc:
        raise ServiceError(422, "bad_option", f"'options' must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ServiceError(422, "bad_option", "'options' must be a JSON object, e.g. {\"k\": 3}")
    return value


# ----------------------------------------------------------------------------- app
def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the service on ``settings.data_dir`` (created if missing)."""
    settings = settings or ServiceSettings.from_env()
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    public_docs = not settings.token  # with a token, the schema needs it too and /docs is off
    app = FastAPI(
        title="anomalens inspection service",
        version=__version__,
        description="Inspect images with zero-/few-shot anomaly detectors through named profiles.",
        lifespan=_lifespan,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
    )
    app.state.settings = settings
    app.state.data_dir = data_dir
    app.state.redact = redact = _redactor(data_dir)
    gate = PixelGate(settings.decode_pixels)
    profiles = ProfileStore(data_dir / "profiles")
    store = ResultStore(settings.resolved_database_url)
    engine = InspectionEngine(data_dir, profiles, store, cache_size=settings.cache_size)

    def run_job(job_id: str) -> None:
        """Inspect a stored job's pending images, one batch at a time, from the data folder."""
        job = store.get_job(job_id)
        if job is None:
            raise ServiceError(404, "not_found", f"job {job_id} is not in the store")
        try:
            profile = profiles.get(job.profile)
        except ServiceError:
            raise ServiceError(
                409, "profile_gone", f"profile {job.profile!r} was deleted before the job finished"
            ) from None
        if profile.uid != job.profile_uid:
            raise ServiceError(
                409,
                "profile_gone",
                f"profile {job.profile!r} was re-created before the job finished",
            )
        pending = store.pending_items(job_id)
        # batch methods score the job's images together (the detector's own fact)
        batch = get_detector_class(profile.method).scores_whole_batch
        step = max(len(pending), 1) if batch else 8
        for i in range(0, len(pending), step):
            images = []
            for item in pending[i : i + step]:
                try:
                    array = load_image(_stored_image_path(data_dir, item["sha256"]))
                except ImageReadError:
                    raise ServiceError(
                        500,
                        "image_gone",
                        f"the stored copy of {item['file_name']!r} is missing or unreadable; "
                        "the job cannot finish",
                    ) from None
                images.append(DecodedImage(item["file_name"], item["sha256"], array))
            engine.inspect(
                profile,
                images,
                job_id=job_id,
                progress=lambda recs: store.mark_items_done(job_id, recs),
                queued_at=_epoch(job.created_at),
            )

    jobs = JobManager(store, run_job, workers=settings.workers)
    app.state.profiles, app.state.store, app.state.engine, app.state.jobs = (
        profiles,
        store,
        engine,
        jobs,
    )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        path = request.url.path
        if path == "/" or path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
            response.headers["Referrer-Policy"] = "no-referrer"
        if path.startswith("/api/") or path == "/openapi.json":
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.middleware("http")
    async def _same_site(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        """Refuses foreign ``Host`` headers (DNS rebinding) and cross-site state changes."""
        host = request.headers.get("host", "")
        if not settings.host_allowed(host):
            return _error(
                400,
                "bad_host",
                f"Host {host[:100]!r} is not a name of this server; add it to "
                "ANOMALENS_ALLOWED_HOSTS if clients use it",
            )
        if request.method not in _SAFE_METHODS:
            site = request.headers.get("sec-fetch-site")
            origin = request.headers.get("origin")
            if site is not None and site not in ("same-origin", "none"):
                return _error(
                    403, "cross_site", f"cross-site {request.method} refused ({site} request)"
                )
            if origin is not None and not _same_origin(origin, host, settings):
                return _error(
                    403,
                    "cross_site",
                    f"cross-origin {request.method} refused: Origin {origin[:100]!r} is not "
                    "this server",
                )
        return await call_next(request)

    _install_error_handlers(app)

    @app.get("/api/health", response_model=HealthOut, tags=["service"])
    def health() -> HealthOut:
        """Liveness and the settings a client needs (no token required)."""
        return HealthOut(
            status="ok",
            version=__version__,
            database=store.backend,
            auth=bool(settings.token),
            max_upload_mb=settings.max_upload_mb,
            sync_batch_limit=settings.sync_batch_limit,
        )

    api = APIRouter(prefix="/api", dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)

    if not public_docs:

        @api.get("/openapi.json", include_in_schema=False)
        def openapi_schema() -> JSONResponse:
            """The OpenAPI schema (token required, like the API)."""
            return JSONResponse(app.openapi())

    @api.get("/methods", response_model=list[MethodOut], tags=["profiles"])
    def methods() -> list[MethodOut]:
        """Detector methods a profile can use."""
        return [
            MethodOut(name=n, learning_type=get_detector_class(n).learning_type.value)
            for n in list_detectors()
        ]

    @api.get("/profiles", response_model=list[ProfileOut], tags=["profiles"])
    def list_profiles() -> list[ProfileOut]:
        return [_profile_out(p) for p in profiles.list()]

    @api.post("/profiles", response_model=ProfileOut, status_code=201, tags=["profiles"])
    def create_profile(
        name: str = Form(..., description="1-64 lower case letters, digits, '-' or '_'"),
        method: str = Form(..., description="detector name, see /api/methods"),
        backbone: str | None = Form(None),
        weights: str | None = Form(None, description="weights name/file known to the server"),
        image_size: int | None = Form(None, ge=32, le=2048),
        object_name: str | None = Form(
            None,
            max_length=64,
            description="optional object name for methods whose prompts name the object "
            "(WinCLIP); the others ignore it",
        ),
        options: str | None = Form(None, description="more detector options as a JSON object"),
        threshold_mode: Literal["leave-one-out", "fixed"] = Form("leave-one-out"),
        threshold: float | None = Form(None, description="the value of a fixed threshold"),
        percentile: float = Form(100.0, ge=0, le=100),
        margin: float = Form(1.0, gt=0),
        files: list[UploadFile] | None = File(None, description="normal images"),
    ) -> ProfileOut:
        """Create a profile: fit the method on the normal images and set its threshold."""
        opts = _parse_options(options)
        for key, value in (
            ("backbone", backbone),
            ("weights", weights),
            ("image_size", image_size),
        ):
            if value not in (None, ""):
                opts[key] = value
        policy = ThresholdPolicy(threshold_mode, threshold, percentile, margin)
        policy.check()
        with _read_uploads(list(files or []), settings, gate) as (good, bad):
            if bad:  # a profile is made from exactly what was sent, or not at all
                raise ServiceError(400, "bad_image", "; ".join(b["message"] for b in bad[:5]))
            profile, detector = profiles.create(
                name, method, opts, good, policy, category=object_name
            )
        engine.cache.put(profile, detector)
        return _profile_out(profile)

    @api.post("/profiles/import", response_model=ProfileOut, status_code=201, tags=["profiles"])
    def import_profile(
        name: str = Form(..., description="1-64 lower case letters, digits, '-' or '_'"),
        model: UploadFile = File(..., description="a model file from `anomalens fit`"),
    ) -> ProfileOut:
        """Create a profile from a fitted model file (``.anomalens``): no normal images needed."""
        profile, detector = profiles.create_from_model(name, model.file.read())
        engine.cache.put(profile, detector)
        return _profile_out(profile)

    @api.get("/profiles/{name}", response_model=ProfileOut, tags=["profiles"])
    def get_profile(name: str) -> ProfileOut:
        return _profile_out(profiles.get(name))

    @api.delete("/profiles/{name}", response_model=ProfileOut, tags=["profiles"])
    def delete_profile(name: str) -> ProfileOut:
        """Delete a profile; its inspection history stays."""
        p = profiles.delete(name)
        engine.cache.evict(name)
        return _profile_out(p)

    @api.post("/profiles/{name}/inspect", response_model=InspectOut, tags=["inspect"])
    def inspect(
        request: Request, name: str, files: list[UploadFile] = File(..., description="images")
    ) -> InspectOut:
        """Inspect up to ``sync_batch_limit`` images and wait for the results.

        A retry with the same ``Idempotency-Key`` header returns the results of the first
        request instead of inspecting again.
        """
        t0 = time.perf_counter()
        arrived = time.time()
        key = _idempotency_key(request)
        profile = profiles.get(name)
        profile.threshold_obj()  # a broken profile is refused before anything is stored
        if key is not None and (known := store.recall_inspection(name, key)) is not None:
            return InspectOut(
                profile=name,
                results=[record_to_out(r) for r in known[0]],
                errors=known[1],  # type: ignore[arg-type]
                seconds=time.perf_counter() - t0,
            )
        if len(files) > settings.sync_batch_limit:
            raise ServiceError(
                413,
                "too_many_files",
                f"{len(files)} images is more than {settings.sync_batch_limit} per /inspect call; "
                f"submit them as a job: POST /api/profiles/{name}/jobs",
            )
        with _read_uploads(files, settings, gate) as (good, bad):
            _require_some(good, bad)
            records = engine.inspect(profile, good, queued_at=arrived)
        if key is not None:
            store.remember_inspection(name, key, [r["id"] for r in records], bad)
        return InspectOut(
            profile=name,
            results=[record_to_out(r) for r in records],
            errors=bad,  # type: ignore[arg-type]
            seconds=time.perf_counter() - t0,
        )

    @api.post("/profiles/{name}/jobs", response_model=JobOut, status_code=202, tags=["inspect"])
    def submit_job(
        request: Request, name: str, files: list[UploadFile] = File(..., description="images")
    ) -> JobOut:
        """Inspect a batch in the background; poll ``GET /api/jobs/{id}`` for progress.

        The job and its images are stored before the answer: a restarted server resumes it.
        A retry with the same ``Idempotency-Key`` header returns the job already made.
        """
        key = _idempotency_key(request)
        profile = profiles.get(name)
        profile.threshold_obj()  # a broken profile is refused before anything is stored
        if key is not None and (known := store.find_job(name, key)) is not None:
            return _job_out(known, store, redact)
        with _read_uploads(files, settings, gate) as (good, bad):
            _require_some(good, bad)
            for im in good:  # the pending images, where the engine keeps inspected ones
                path = _stored_image_path(data_dir, im.sha256)
                if not path.exists():
                    atomic_save_png(path, im.array)
            items = [(im.file_name, im.sha256) for im in good]
            good.clear()  # the pixels are on disk now; the job reads them back batch by batch
        job = store.create_job(uuid.uuid4().hex, name, profile.uid, items, bad, idempotency_key=key)
        jobs.start(job.id)
        return _job_out(job, store, redact)

    @api.get("/jobs", response_model=list[JobOut], tags=["inspect"])
    def list_jobs() -> list[JobOut]:
        return [_job_out(j, store, redact) for j in jobs.list()]

    @api.get("/jobs/{job_id}", response_model=JobOut, tags=["inspect"])
    def get_job(job_id: str) -> JobOut:
        return _job_out(jobs.get(job_id), store, redact)

    def _filters(
        profile: str | None = Query(None),
        verdict: Literal["normal", "anomalous"] | None = Query(None),
        since: datetime | None = Query(None, description="ISO time, inclusive (UTC if no zone)"),
        until: datetime | None = Query(None, description="ISO time, exclusive (UTC if no zone)"),
    ) -> HistoryFilter:
        for name, value in (("since", since), ("until", until)):
            if value is None:
                continue
            try:
                utc_naive(value)
            except OverflowError:
                raise ServiceError(
                    422, "invalid_request", f"{name}: {value.isoformat()} is out of range in UTC"
                ) from None
        return HistoryFilter(profile or None, verdict, since, until)

    @api.get("/results", response_model=HistoryPage, tags=["history"])
    def history(
        filters: HistoryFilter = Depends(_filters),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=_MAX_SQL_INT),
    ) -> HistoryPage:
        """Inspection history, newest first."""
        rows, total = store.query(filters, limit=limit, offset=offset)
        return HistoryPage(
            items=[record_to_out(r) for r in rows], total=total, limit=limit, offset=offset
        )

    @api.get(
        "/results.csv",
        tags=["history"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/csv": {}}}},
    )
    def export_csv(filters: HistoryFilter = Depends(_filters)) -> StreamingResponse:
        """The filtered history as CSV."""
        return StreamingResponse(
            store.iter_csv(filters),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="anomalens-results.csv"'},
        )

    @api.get("/results/{record_id}", response_model=InspectionOut, tags=["history"])
    def get_result(record_id: int = PathParam(..., ge=1, le=_MAX_SQL_INT)) -> InspectionOut:
        rec = store.get(record_id)
        if rec is None:
            raise ServiceError(404, "not_found", f"no inspection with id {record_id}")
        return record_to_out(rec)

    @api.get(
        "/results/{record_id}/{kind}.png",
        tags=["history"],
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    def result_file(
        kind: ArtifactKind, record_id: int = PathParam(..., ge=1, le=_MAX_SQL_INT)
    ) -> FileResponse:
        """The inspected image, overlay, heat map or mask of a result, as PNG."""
        rec = store.get(record_id)
        if rec is None:
            raise ServiceError(404, "not_found", f"no inspection with id {record_id}")
        path = (data_dir / rec[f"{kind.value}_path"]).resolve()
        if data_dir not in path.parents or not path.is_file():
            raise ServiceError(
                404, "not_found", f"the {kind.value} file of inspection {record_id} is gone"
            )
        return FileResponse(path, media_type="image/png")

    app.include_router(api)
    jobs.resume_all()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
