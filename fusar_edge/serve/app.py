"""The HTTP API over one shared ``Runtime`` (FastAPI; run by uvicorn in ``cli_serve``).

Routes:

- ``POST /v1/ask``: multipart form: ``image`` (file) or ``path`` (under an ``--allow-dir``),
  ``question``; optional ``task``, ``label``, ``bbox`` (``LON_MIN,LAT_MIN,LON_MAX,LAT_MAX``),
  ``date`` (YYYY-MM-DD), ``anchors`` (an .npz/.npy file), ``max_new_tokens``, ``no_anchors``,
  ``band`` (of a multi-band GeoTIFF).
  Returns the JSON of ``fusar-edge ask --json``.
- ``POST /v1/chat/completions``: OpenAI's chat format; the last user message's text is the
  question and its one ``image_url`` part a ``data:`` URL (the server fetches nothing).
  Greedy decoding, so sampling fields are ignored; ``max_tokens`` caps the answer. The
  answer's fusar-edge JSON rides along as ``fusar``.
- ``GET /healthz`` (no token needed), ``GET /metrics`` (Prometheus text).

Every error is JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with the field named; never a stack trace (those go to the server log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import math
import re
import shutil
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FusarError, InputError, MissingAnchorsError
from .metrics import ServerMetrics
from .pool import AskPool, Busy, TimedOut

log = logging.getLogger("fusar_edge.serve")

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}
ANCHOR_SUFFIXES = {".npz", ".npy"}
DATA_URL_TYPES = {"image/png": ".png", "image/tiff": ".tif", "image/jpeg": ".jpg"}
RETRY_AFTER_S = 2


@dataclass
class ServeSettings:
    token: str | None = None  # bearer token; None: no authentication (loopback use)
    allow_dirs: list[Path] = field(default_factory=list)  # where `path` may point
    workers: int = 2
    max_queue: int = 16
    timeout_s: float = 120.0
    max_upload_bytes: int = 64 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error_body(message: str, kind: str, param: str | None, status: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413: by Content-Length before reading, and by
    counting for chunked bodies (the app's own answer is then replaced by the 413)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _send_413(self, send) -> None:
        body = JSONResponse(_error_body(f"request body: larger than the server's limit of {self.limit} bytes "
                                        "(--max-upload-mb)", "request_too_large", None, 413), status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._send_413(send)
        state = {"received": 0, "over": False, "replaced": False}

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        async def guarded_send(message):
            if state["over"]:
                if not state["replaced"] and message["type"] == "http.response.start":
                    state["replaced"] = True
                    await self._send_413(send)
                return
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


class ShutdownGuard:
    """A request the server's shutdown cuts off gets a 503 in the API's JSON shape.

    When its graceful-shutdown time (``--timeout``) is up, uvicorn cancels the requests still
    running: an upload that stalled, a question still being answered. With nothing sent yet,
    uvicorn would answer a plain-text 500 and log a traceback; the client is told instead that
    the server is stopping and when to retry, and the log gets one line."""

    def __init__(self, app, on_cut: Callable[[dict], None] | None = None):
        self.app, self.on_cut = app, on_cut

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if started:  # part of the answer is out: nothing better to say
                raise
            log.warning("%s %s: cut off by the server's shutdown before it was answered", scope.get("method"),
                        scope.get("path"))
            if self.on_cut is not None:
                self.on_cut(scope)
            body = JSONResponse(_error_body("server stopping: the request was cut off before it was answered; retry "
                                            "once the server is back", "unavailable", None, 503), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            await send({"type": "http.response.start", "status": 503, "headers": body.raw_headers})
            await send({"type": "http.response.body", "body": body.body})
            # returned, not re-raised: the task ends cleanly and uvicorn's shutdown goes on


def _parse_bbox(text: str | list | None, param: str = "bbox") -> tuple[float, float, float, float] | None:
    if text is None or text == "":
        return None
    parts = text if isinstance(text, list) else str(text).split(",")
    try:
        values = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ApiError(422, f"{param}: expected four numbers LON_MIN,LAT_MIN,LON_MAX,LAT_MAX, got {text!r}", param)
    return values  # type: ignore[return-value]


def _safe_suffix(filename: str | None, allowed: set[str], param: str) -> str:
    suffix = Path(filename or "").suffix.lower()
    if suffix not in allowed:
        raise ApiError(422, f"{param}: expected a file ending in {', '.join(sorted(allowed))}, got "
                            f"{filename or 'no file name'!r}", param)
    return suffix


async def _save_upload(upload: UploadFile, folder: Path, stem: str, allowed: set[str], param: str,
                       limit: int) -> Path:
    path = folder / f"{stem}{_safe_suffix(upload.filename, allowed, param)}"
    written = 0
    with path.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            written += len(chunk)
            if written > limit:  # BodyLimit caught it already; this keeps the function honest alone
                raise ApiError(413, f"{param}: larger than {limit} bytes", param, "request_too_large")
            out.write(chunk)
    if written == 0:
        raise ApiError(422, f"{param}: the uploaded file is empty", param)
    return path


def _resolve_allowed(path: str, allow_dirs: list[Path]) -> Path:
    if not allow_dirs:
        raise ApiError(403, "path: this server reads no paths (start it with --allow-dir DIR, or upload the image)",
                       "path", "permission_error")
    for root in allow_dirs:
        try:
            candidate = (root / path).resolve()  # an absolute `path` replaces root; symlinks are followed
            inside = candidate.is_relative_to(root)
            is_file = inside and candidate.is_file()
        except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ApiError(422, f"path: not a usable file name ({reason})", "path") from None
        if inside:
            if not is_file:
                raise ApiError(422, f"path: {path!r} is not a file under {root.name}/", "path")
            return candidate
    raise ApiError(403, f"path: {path!r} is outside the directories this server may read (--allow-dir)", "path",
                   "permission_error")


def build_app(runtime, settings: ServeSettings) -> FastAPI:
    """The FastAPI app around ``runtime``, wrapped in the body-size limit (an ASGI app)."""
    pool = AskPool(settings.workers, settings.max_queue, settings.timeout_s)
    metrics = ServerMetrics(pool)
    allow_dirs = [Path(d).resolve() for d in settings.allow_dirs]
    limit_tokens = int(runtime.config.max_new_tokens)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown()  # uvicorn has stopped taking requests; let admitted questions finish

    app = FastAPI(title="fusar-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorize(request: Request) -> None:
        if settings.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
            raise ApiError(401, "authorization: expected 'Bearer <token>' with the server's token", "authorization",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    def error_response(request: Request, exc: ApiError) -> JSONResponse:
        route = _route_label(request)  # any path a client makes up must not add a metrics series
        metrics.errors.labels(route, exc.kind).inc()
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param, exc.status), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request, _validation_error(request, exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own refusals (no route, wrong method, an unparsable multipart body) in our shape."""
        if exc.status_code == 404:
            return error_response(request, ApiError(404, f"{request.url.path}: no such route ({ROUTES})",
                                                    kind="not_found"))
        if exc.status_code == 405:
            return error_response(request, ApiError(405, f"{request.method} {request.url.path}: method not allowed "
                                                         f"({ROUTES})", kind="invalid_request_error",
                                                    headers=dict(exc.headers or {})))
        return error_response(request, ApiError(exc.status_code, f"request body: {exc.detail}"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(request, ApiError(500, "internal error; the server log has the details",
                                                kind="server_error"))

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = _route_label(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    async def answer(work_dir: Path, image: Path, shown: str, question: str, anchor_name: str = "anchors",
                     **kwargs) -> tuple[Any, dict]:
        """Run ``runtime.ask`` in the pool; -> (the answer, its JSON for the client). The upload
        folder goes when the question is done.
        Errors name the files as the client knows them (``shown``, ``anchor_name``), not the
        server's temporary copies; so does the answer (``anchor.source``)."""
        names = {str(image): shown, str(work_dir): "upload"}
        if kwargs.get("anchors") is not None:
            names = {str(kwargs["anchors"]): anchor_name, **names}

        def work():
            try:
                return runtime.ask(image, question, **kwargs)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)

        try:
            ans = await pool.run(work)
        except Busy:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise ApiError(503, f"server busy: {pool.workers} questions running and {pool.max_queue} waiting; "
                                f"retry in {RETRY_AFTER_S} s", None, "overloaded",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        except TimedOut:
            raise ApiError(504, f"timeout: no answer within {settings.timeout_s:g} s (--timeout)", None,
                           "timeout") from None
        except MissingAnchorsError:
            # the runtime's advice names CLI flags; a client has its own three ways
            raise ApiError(422, f"anchors: {shown}: this model applies TLM, which needs AEF anchors, and none were "
                                "given: send an anchors file (curl -F anchors=@FILE.npz), or a GeoTIFF with a server "
                                "started with --tiles DIR, or no_anchors=true to answer without them", "anchors") from None
        except InputError as exc:
            message = _client_names(str(exc), names)
            raise ApiError(422, message, _param_of(message)) from None
        except FusarError as exc:
            raise ApiError(500, str(exc), None, "server_error") from None
        metrics.observe_answer(ans.timings_ms, int(ans.model.get("new_tokens", 0)))
        out = ans.to_json()
        anchor = out.get("anchor")
        if isinstance(anchor, dict) and isinstance(anchor.get("source"), str):
            anchor["source"] = _client_names(anchor["source"], names)
        return ans, out

    def cap_tokens(value: int | None, param: str) -> int | None:
        if value is None:
            return None
        if not 1 <= value <= limit_tokens:
            raise ApiError(422, f"{param}: expected 1..{limit_tokens} (the bundle's limit), got {value}", param)
        return value

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": runtime.source, "weights": runtime.weights, "backend": runtime.backend,
                "workers": pool.workers, "running": pool.running, "queued": pool.queued}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics_text():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/ask", dependencies=[Depends(authorize)])
    async def ask(question: str = Form(...), image: UploadFile | None = File(None), path: str | None = Form(None),
                  task: str | None = Form(None), label: str | None = Form(None), bbox: str | None = Form(None),
                  date: str | None = Form(None), anchors: UploadFile | None = File(None),
                  max_new_tokens: int | None = Form(None), no_anchors: bool = Form(False),
                  band: int | None = Form(None)):
        if (image is None) == (path is None):
            raise ApiError(422, "image: give an image file or a path, not both and not neither", "image")
        box = _parse_bbox(bbox)
        tokens = cap_tokens(max_new_tokens, "max_new_tokens")
        work_dir = Path(tempfile.mkdtemp(prefix="fusar-serve-"))
        try:
            if image is not None:
                src = await _save_upload(image, work_dir, "image", IMAGE_SUFFIXES, "image",
                                         settings.max_upload_bytes)
                shown = Path(image.filename or "image").name
            else:
                src = _resolve_allowed(path, allow_dirs)
                shown = path
            anchor_path = None
            if anchors is not None:
                anchor_path = await _save_upload(anchors, work_dir, "anchors", ANCHOR_SUFFIXES, "anchors",
                                                 settings.max_upload_bytes)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        anchor_name = Path(anchors.filename or "anchors").name if anchors is not None else "anchors"
        _, out = await answer(work_dir, src, shown, question, anchor_name, anchors=anchor_path, task=task or None,
                              label=label or None, bbox=box, date=date or None, max_new_tokens=tokens,
                              no_anchors=no_anchors, band=band)
        out["image"]["path"] = shown  # not the server's temporary file
        return out

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        try:
            body = await request.json()
        except Exception:
            raise ApiError(400, "request body: expected a JSON object (OpenAI chat completion request)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body: expected a JSON object (OpenAI chat completion request)")
        if body.get("stream"):
            raise ApiError(422, "stream: streaming is not supported; send stream: false", "stream")
        if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):  # null: the default, as OpenAI's
            raise ApiError(422, "n: only one completion per request (decoding is greedy)", "n")
        question, data_url, param = _last_user_turn(body.get("messages"))
        tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
            raise ApiError(422, f"max_tokens: expected an integer, got {tokens!r}", "max_tokens")
        tokens = cap_tokens(tokens, "max_tokens")
        no_anchors = body.get("no_anchors", False)
        if not isinstance(no_anchors, bool):  # "false" is a true string: refuse rather than guess
            raise ApiError(422, f"no_anchors: expected true or false, got {no_anchors!r}", "no_anchors")
        work_dir = Path(tempfile.mkdtemp(prefix="fusar-serve-"))
        try:
            src = _save_data_url(data_url, work_dir, param)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        ans, out = await answer(work_dir, src, "the data: URL image", question, task=body.get("task"),
                                label=body.get("label"), bbox=_parse_bbox(body.get("bbox")), date=body.get("date"),
                                max_new_tokens=tokens, no_anchors=no_anchors)
        out["image"]["path"] = "data-url"
        new, limit = int(ans.model["new_tokens"]), int(ans.model["max_new_tokens"])
        prompt = int(ans.model.get("prompt_tokens", 0))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": str(body.get("model") or runtime.source),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                             "finish_reason": "length" if new >= limit else "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new},
                "fusar": out}

    def count_cut(scope: dict) -> None:
        route = _route_label(Request(scope))
        metrics.requests.labels(route, "503").inc()
        metrics.errors.labels(route, "unavailable").inc()

    return ShutdownGuard(BodyLimit(app, settings.max_upload_bytes), count_cut)


KNOWN_ROUTES = {"/v1/ask", "/v1/chat/completions", "/healthz", "/metrics"}
ROUTES = "POST /v1/ask, POST /v1/chat/completions, GET /healthz, GET /metrics"
# form fields of /v1/ask: a runtime error that starts with one of them names it as the error's param
ASK_FIELDS = {"image", "path", "question", "task", "label", "bbox", "date", "anchors", "max_new_tokens", "no_anchors",
              "band"}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _route_label(request: Request) -> str:
    return request.url.path if request.url.path in KNOWN_ROUTES else "other"


def _client_names(text: str, names: dict[str, str]) -> str:
    """``text`` with the server's temporary paths replaced by the names the client sent
    (longest first: the upload folder is a prefix of the files in it)."""
    for server_path in sorted(names, key=len, reverse=True):
        text = text.replace(server_path, names[server_path])
    return text


def _param_of(message: str) -> str | None:
    """The form field a runtime error starts with (``"date: ..."``, ``"band (--band): ..."``), if any."""
    m = re.match(r"([a-z_]+)(?: \(--[a-z-]+\))?:", message)
    return m.group(1) if m and m.group(1) in ASK_FIELDS else None


def _validation_error(request: Request, errors: list) -> ApiError:
    """FastAPI's first validation error as one line naming the field, in our words."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.url.path == "/v1/ask" and ctype not in FORM_TYPES:
        return ApiError(422, f"request body: expected multipart/form-data (fields question, image or path, ...), "
                             f"got {ctype or 'no content type'!r}")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query", "header")]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return ApiError(422, f"{param or 'request'}: required, missing or empty", param)
    if param in ("image", "anchors"):
        return ApiError(422, f"{param}: expected a file part (curl -F {param}=@FILE), not a text field", param)
    return ApiError(422, f"{param or 'request'}: {first.get('msg', 'invalid')}", param)


def _last_user_turn(messages) -> tuple[str, str, str]:
    """-> (question text, image data URL, the URL's param path) of the last user message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "messages: expected a non-empty list of chat messages", "messages")
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(422, "messages: no message with role 'user'", "messages")
    i = users[-1]
    content = messages[i].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(422, f"messages[{i}].content: expected a string or a list of parts", f"messages[{i}].content")
    texts, urls = [], []
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(422, f"{where}.image_url.url: expected a string", f"{where}.image_url.url")
            urls.append((url, f"{where}.image_url.url"))
        else:
            raise ApiError(422, f"{where}: expected a part of type 'text' or 'image_url'", where)
    if len(urls) != 1:
        raise ApiError(422, f"messages[{i}].content: expected exactly one image_url part, got {len(urls)}",
                       f"messages[{i}].content")
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise ApiError(422, f"messages[{i}].content: no question text", f"messages[{i}].content")
    return question, urls[0][0], urls[0][1]


_DATA_URL = re.compile(r"data:(?P<mime>[\w/+.-]+)(?:;[\w=.-]+)*;base64,(?P<data>.*)", re.S)


def _save_data_url(url: str, folder: Path, param: str) -> Path:
    m = _DATA_URL.fullmatch(url.strip())
    if m is None:
        raise ApiError(422, f"{param}: expected a data: URL with base64 image bytes (the server fetches nothing)",
                       param)
    suffix = DATA_URL_TYPES.get(m["mime"].lower())
    if suffix is None:
        raise ApiError(422, f"{param}: image type {m['mime']!r} not supported; expected one of "
                            f"{', '.join(DATA_URL_TYPES)}", param)
    try:
        raw = base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{param}: the base64 payload does not decode", param) from None
    if not raw:
        raise ApiError(422, f"{param}: the image is empty", param)
    path = folder / f"image{suffix}"
    path.write_bytes(raw)
    return path
