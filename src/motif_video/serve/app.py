"""The HTTP server: an OpenAI-style videos API (`/v1/videos`, as SGLang Diffusion and vLLM-Omni serve it, with the
Motif settings as extra fields), health, Prometheus metrics, and the web UI, all on one job queue.

`create_app(pipe, settings)` builds the FastAPI app around an already loaded pipeline; the worker thread starts and
stops with the app's lifespan (uvicorn turns SIGTERM into that shutdown).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .files import JobFiles, is_job_id, new_job_id
from .lora import lora_supported
from .metrics import ServerMetrics
from .params import ApiError, ModelInfo, ServeSettings, bad_request, batch_key, lora_files, parse_video_request
from .queue.store import COMPLETED, QUEUED, Job, JobStore, QueueFull
from .worker import Worker

log = logging.getLogger("motif_video.serve")

UI_COOKIE = "motif_video_session"
# The UI's files, served by name from the package (no directory listing, no paths from requests).
UI_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8"}
MAX_IMAGE_PIXELS = 40_000_000  # a decoded upload larger than this is refused (decompression bombs)


@dataclass
class Server:
    pipe: object
    settings: ServeSettings
    model: ModelInfo
    store: JobStore
    files: JobFiles
    metrics: ServerMetrics
    worker: Worker
    loras_supported: bool

    def session_token(self) -> str:
        """The UI cookie: derived from the key, so the key itself is never stored in the browser."""
        return hmac.new(self.settings.api_key.encode(), b"motif-video-ui", hashlib.sha256).hexdigest()

    def authorized(self, request: Request) -> bool:
        key = self.settings.api_key
        if key is None:
            return True
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and hmac.compare_digest(header[7:].strip().encode(), key.encode()):
            return True
        cookie = request.cookies.get(UI_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.session_token().encode())


def video_object(server: Server, job: Job) -> dict:
    p = job.params
    obj = {
        "id": job.id, "object": "video", "status": job.status, "progress": job.progress,
        "created_at": int(job.created_at), "completed_at": int(job.completed_at) if job.completed_at else None,
        "expires_at": None, "model": p["model"], "size": f"{p['width']}x{p['height']}", "seconds": p["seconds"],
        "prompt": p["prompt"], "error": None,
        # Motif extensions
        "num_frames": p["num_frames"], "fps": server.model.fps, "seed": p["seed"],
        "num_inference_steps": p["num_inference_steps"], "guidance_scale": p["guidance_scale"],
        "negative_prompt": p["negative_prompt"], "loras": [{"name": n, "scale": s} for n, s in p["loras"]],
        "input_reference": p["has_image"], "generation_seconds": job.generation_seconds,
    }
    if job.status == QUEUED:
        obj["queue_position"] = server.store.queue_position(job)
    if job.error_code:
        obj["error"] = {"code": job.error_code, "message": job.error_message}
    return obj


def create_app(pipe, settings: ServeSettings, model_name: str) -> FastAPI:
    files = JobFiles(settings.data_dir)
    store = JobStore(files.database)
    metrics = ServerMetrics(store)
    model = ModelInfo.from_pipeline(pipe, model_name, settings)
    worker = Worker(pipe, store, files, model, settings, metrics)
    server = Server(pipe, settings, model, store, files, metrics, worker, lora_supported(pipe))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        requeued, failed = store.recover()
        if requeued or failed:
            log.warning("recovered %d unfinished jobs (%d failed after repeated crashes)", requeued, failed)
        worker.start()
        try:
            yield
        finally:
            import asyncio

            # Blocking wait off the event loop: the running job may take up to the grace period to finish.
            await asyncio.get_running_loop().run_in_executor(None, worker.stop, settings.shutdown_grace_s)
            store.close()

    app = FastAPI(title="motif-video", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    # -- errors in the OpenAI shape --------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        headers = {"Retry-After": "5"} if error.status == 429 else None
        if error.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(ApiError(error.status_code, str(error.detail), code).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return JSONResponse(bad_request(f"{where}: {first.get('msg', 'invalid value')}", where or None).body(),
                            status_code=400)

    def require_key(request: Request) -> None:
        if not server.authorized(request):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key",
                           kind="authentication_error")

    def find(job_id: str) -> Job:
        job = store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise ApiError(404, f"no video with id {job_id!r}", "not_found")
        return job

    # -- service endpoints -----------------------------------------------------------------------------------------
    @app.get("/health")
    def health():
        counts = store.counts()
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "worker_stopped", "model": model.name,
                             "queue_length": counts["queued"] + counts["in_progress"]},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        require_key(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models(request: Request):
        require_key(request)
        return {"object": "list", "data": [model.public()]}

    @app.get("/v1/loras")
    def loras(request: Request):
        require_key(request)
        names = list(lora_files(settings.lora_dir)) if server.loras_supported else []
        return {"object": "list", "available": server.loras_supported, "data": [{"name": n} for n in names]}

    # -- videos ----------------------------------------------------------------------------------------------------
    @app.post("/v1/videos")
    async def create_video(request: Request):
        require_key(request)
        fields, image = await _read_submission(request, settings.max_upload_bytes)
        params = parse_video_request(fields, model, settings, has_image=image is not None,
                                     loras_supported=server.loras_supported)
        job_id = new_job_id()
        if image is not None:
            _save_image(image, files.input_image(job_id))
        try:
            job = store.submit(job_id, params, batch_key(params), settings.max_queue)
        except QueueFull as e:
            files.remove(job_id)
            metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, str(e), "queue_full", kind="rate_limit_error") from None
        metrics.submitted.inc()
        worker.notify()
        return video_object(server, job)

    @app.get("/v1/videos")
    def list_videos(request: Request, limit: int = 20, after: str | None = None):
        require_key(request)
        if not 1 <= limit <= 100:
            raise bad_request("limit must be within 1..100", "limit")
        if after is not None and not is_job_id(after):
            raise ApiError(404, f"no video with id {after!r}", "not_found", param="after")
        jobs, has_more = store.list(limit, after)
        data = [video_object(server, j) for j in jobs]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}")
    def get_video(request: Request, video_id: str):
        require_key(request)
        return video_object(server, find(video_id))

    @app.get("/v1/videos/{video_id}/content")
    def video_content(request: Request, video_id: str, variant: str = "video", download: bool = False):
        require_key(request)
        job = find(video_id)
        if variant == "preview":  # extension: the running job's current predicted first frame
            frame = worker.preview(job.id)
            if frame is None:
                raise ApiError(404, "no preview yet", "not_ready")
            return Response(frame, media_type="image/png", headers={"Cache-Control": "no-store"})
        if variant not in ("video", "thumbnail"):
            raise bad_request("variant must be video, thumbnail or preview", "variant")
        if job.status != COMPLETED:
            raise ApiError(409, f"video {job.id} is {job.status}, not completed", "not_ready")
        path = files.video(job.id) if variant == "video" else files.thumbnail(job.id)
        if not path.is_file():
            raise ApiError(404, f"the file of video {job.id} is gone", "not_found")
        kind = "video/mp4" if variant == "video" else "image/png"
        name = path.name if download else None
        return FileResponse(path, media_type=kind, filename=name,
                            content_disposition_type="attachment" if download else "inline")

    @app.delete("/v1/videos/{video_id}")
    def delete_video(request: Request, video_id: str):
        require_key(request)
        job = find(video_id)
        store.delete(job.id)
        if not worker.cancel(job.id):
            files.remove(job.id)  # a running job's files are removed by the worker once its call has stopped
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    # -- the web UI ------------------------------------------------------------------------------------------------
    @app.get("/")
    def index(request: Request):
        if not server.authorized(request):
            return HTMLResponse(_login_page(bad=request.query_params.get("bad") == "1"), status_code=401)
        return _ui_file("index.html")

    @app.get("/ui/{name}")
    def ui_file(request: Request, name: str):
        require_key(request)
        if name not in UI_FILES:
            raise ApiError(404, f"no UI file {name!r}", "not_found")
        return _ui_file(name)

    @app.post("/ui/login")
    async def login(request: Request):
        form = await request.form()
        key = str(form.get("key", ""))
        if settings.api_key is None or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
            return RedirectResponse("/?bad=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(UI_COOKIE, server.session_token(), httponly=True, samesite="strict")
        return response

    return app


def _ui_file(name: str) -> Response:
    data = resources.files("motif_video.serve").joinpath("static", name).read_bytes()
    return Response(data, media_type=UI_FILES[name], headers={"Cache-Control": "no-cache"})


def _login_page(bad: bool) -> str:
    message = '<p class="bad">Wrong key.</p>' if bad else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>motif-video</title>
<style>body{{font-family:system-ui,sans-serif;display:grid;place-items:center;height:90vh;background:#111;color:#eee}}
input,button{{font-size:1rem;padding:.4rem}} .bad{{color:#f66}}</style></head>
<body><form method="post" action="/ui/login"><h1>motif-video</h1><p>This server needs its API key.</p>{message}
<input type="password" name="key" id="key" placeholder="API key" autofocus> <button type="submit">Enter</button>
</form></body></html>"""


async def _read_submission(request: Request, max_upload: int) -> tuple[dict, bytes | None]:
    """The request's fields and the uploaded first frame (bytes or None), from JSON or multipart."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    slack = 64 * 1024  # room for the form's text fields around the file
    if length is not None and length.isdigit() and int(length) > max_upload + slack:
        raise ApiError(413, f"the request is larger than this server's upload limit of {max_upload} bytes",
                       "upload_too_large")
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # malformed multipart bodies
            raise bad_request(f"cannot parse the multipart form: {e}") from None
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("input_reference")
        image = None
        if upload is not None and not isinstance(upload, str):
            image = await upload.read(max_upload + 1)
            if len(image) > max_upload:
                raise ApiError(413, f"input_reference is larger than this server's upload limit of {max_upload} "
                                    "bytes", "upload_too_large", param="input_reference")
        elif isinstance(upload, str) and upload:
            image = _data_url(upload, max_upload)
        return fields, image
    if kind in ("application/json", ""):
        body = await request.body()
        if len(body) > max_upload + slack:
            raise ApiError(413, "the request is larger than this server's upload limit", "upload_too_large")
        import json

        try:
            fields = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise bad_request("the body must be a JSON object")
        reference = fields.pop("input_reference", None)
        if reference is not None and not isinstance(reference, str):
            raise bad_request("input_reference in JSON must be a data: URL; upload files with multipart",
                              "input_reference")
        return fields, _data_url(reference, max_upload) if reference else None
    raise ApiError(415, f"unsupported content type {kind!r}: send JSON or multipart/form-data", "unsupported_media_type")


def _data_url(text: str, max_upload: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL (OpenAI clients send images this way in JSON)."""
    if not text.startswith("data:") or ";base64," not in text[:100]:
        raise bad_request("input_reference must be an uploaded file or a data:image/...;base64 URL",
                          "input_reference")
    try:
        data = base64.b64decode(text.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("input_reference is not valid base64", "input_reference") from None
    if len(data) > max_upload:
        raise ApiError(413, f"input_reference is larger than this server's upload limit of {max_upload} bytes",
                       "upload_too_large", param="input_reference")
    return data


def _save_image(data: bytes, path) -> None:
    """Decode an uploaded image and store it re-encoded as PNG under a server-made name."""
    import warnings

    import numpy as np
    from PIL import Image

    from ..pipeline.video_io import write_video

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise bad_request(f"input_reference is {image.width}x{image.height}, over the "
                                      f"{MAX_IMAGE_PIXELS} pixel limit", "input_reference", code="invalid_image")
                rgb = np.asarray(image.convert("RGB"))
    except ApiError:
        raise
    except Exception:  # Pillow raises many kinds for corrupt data
        raise bad_request("input_reference is not a readable image (PNG, JPEG or WebP)", "input_reference",
                          code="invalid_image") from None
    write_video(rgb[None], path)


__all__ = ["create_app", "video_object"]
