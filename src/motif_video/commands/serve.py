"""`motif-video serve`: load a model once and serve it over an OpenAI-style video API and a web UI (docs/serve.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

from .generate import DEFAULT_MODEL_DIR, DTYPES

API_KEY_ENV = "MOTIF_VIDEO_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an HTTP video API with a web UI and a persistent job queue",
        description="Load a model once and serve it: POST /v1/videos (OpenAI videos API shape), the web UI at /, "
                    "GET /metrics (Prometheus) and /health. Jobs and outputs persist in --data-dir, so a restart "
                    "loses nothing. Without --model, serves the small model shipped with the package.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="model folder or hub id (default: the shipped nano model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY) for the API, downloads and the UI; also read "
                        f"from ${API_KEY_ENV}")
    p.add_argument("--data-dir", default="motif-video-data", help="folder for the job database and the outputs")
    p.add_argument("--max-queue", type=int, default=32, help="queued + running jobs accepted before 429")
    p.add_argument("--max-batch", type=int, default=1,
                   help="compatible queued jobs generated together in one call (same size, frames, steps, guidance, "
                        "negative prompt, LoRAs, no image); see docs/serve.md for when it pays")
    p.add_argument("--max-frames", type=int, default=None, help="refuse jobs with more frames")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse jobs with more pixels per frame (W x H)")
    p.add_argument("--max-steps", type=int, default=100, help="refuse jobs with more denoising steps")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="seconds a job may run before it fails")
    p.add_argument("--keep-outputs", type=int, default=200, help="finished jobs kept (older ones are deleted)")
    p.add_argument("--keep-hours", type=float, default=None, help="delete finished jobs older than this")
    p.add_argument("--lora-dir", default=None,
                   help="folder of LoRA .safetensors files requests may name (the API never loads other paths)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest input_reference image accepted")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of the memory free after loading that one generation may plan to use (estimator)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="on SIGTERM, seconds the running job may take to finish before it is re-queued")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--offload", action="store_true", help="keep only the active component on the GPU")
    p.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the predicted first frame after every step for the live preview (costs one "
                        "one-frame VAE decode per step; see docs/serve.md)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=run)


def _check_port(host: str, port: int) -> None:
    from ..errors import MotifVideoError

    if not 0 < port < 65536:
        raise MotifVideoError(f"port must be within 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MotifVideoError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise MotifVideoError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _lock_data_dir(data_dir: Path):
    """One server per data dir: two workers on one queue would run jobs twice. The lock dies with the process."""
    from ..errors import MotifVideoError
    from ..files import lock_holder, try_exclusive_lock

    handle = try_exclusive_lock(data_dir / "server.lock")
    if handle is None:
        raise MotifVideoError(f"another server ({lock_holder(data_dir / 'server.lock')}) is using {data_dir}; stop "
                              "it or pass another --data-dir")
    return handle


def settings_from_args(args):
    from ..errors import MotifVideoError
    from ..serve.params import ServeSettings

    for name in ("max_queue", "max_batch", "max_steps", "keep_outputs"):
        if getattr(args, name) < 1:
            raise MotifVideoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_frames", "max_pixels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MotifVideoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.job_timeout > 0 or not args.max_upload_mb > 0 or args.shutdown_grace < 0:
        raise MotifVideoError("--job-timeout and --max-upload-mb must be > 0, --shutdown-grace >= 0")
    if not 0 < args.memory_fraction <= 1:
        raise MotifVideoError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    if args.keep_hours is not None and not args.keep_hours > 0:
        raise MotifVideoError(f"--keep-hours must be > 0, got {args.keep_hours}")
    lora_dir = None
    if args.lora_dir is not None:
        lora_dir = Path(args.lora_dir).resolve()
        if not lora_dir.is_dir():
            raise MotifVideoError(f"--lora-dir {args.lora_dir} is not a folder")
    data_dir = Path(args.data_dir).resolve()
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise MotifVideoError("--api-key is empty")
    return ServeSettings(
        data_dir=data_dir, api_key=api_key, max_queue=args.max_queue, max_batch=args.max_batch,
        max_frames=args.max_frames, max_pixels=args.max_pixels, max_steps=args.max_steps,
        job_timeout_s=args.job_timeout, keep_outputs=args.keep_outputs,
        keep_age_s=args.keep_hours * 3600 if args.keep_hours else None, lora_dir=lora_dir,
        max_upload_bytes=int(args.max_upload_mb * 2**20), memory_fraction=args.memory_fraction,
        shutdown_grace_s=args.shutdown_grace, preview=args.preview)


def run(args) -> int:
    from ..errors import MotifVideoError

    # Cheap checks first, so bad input fails before the model loads.
    settings = settings_from_args(args)
    _check_port(args.host, args.port)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MotifVideoError(f"cannot create --data-dir {args.data_dir}: {e.strerror}") from None
    lock = _lock_data_dir(settings.data_dir)
    model = args.model
    if model is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise MotifVideoError("no default model is shipped in this installation; pass --model FOLDER")
        model = DEFAULT_MODEL_DIR

    import torch
    import uvicorn

    from ..pipeline.pipeline import MotifVideoPipeline
    from ..serve.app import create_app

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = MotifVideoPipeline.from_pretrained(model, device=args.device, dtype=dtype, offload=args.offload)
    name = Path(str(model).rstrip("/")).name
    app = create_app(pipe, settings, name)
    print(f"serving {name} on http://{args.host}:{args.port} (data in {settings.data_dir})", flush=True)
    server = _server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        lock.close()
    return 0 if server.started else 1


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT that ends in a clean shutdown exits with status 0 (uvicorn
        re-raises the signal after shutting down, which reports the clean stop as death by signal)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server
