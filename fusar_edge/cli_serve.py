"""``fusar-edge serve``: the runtime over HTTP (FastAPI + uvicorn), one model load for all requests."""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
import sys
from pathlib import Path

from .cli import add_device_args, positive_int
from .errors import InputError

EPILOG = """examples:
  fusar-edge serve --tiles demo/tiles                 # the built-in demo on http://127.0.0.1:8000 (demo/: fusar-edge sample demo)
  fusar-edge serve --bundle bundles/fusar-gpt-7b --tiles aef-store --allow-dir /data/scenes
  fusar-edge serve --host 0.0.0.0 --token-file /etc/fusar/token --workers 4 --max-queue 32
  fusar-edge serve --workers 8 --batch 8                # concurrent questions share ViT calls and decode steps

  curl -F image=@demo/scene.tif -F question="How many ships are there in this image?" http://127.0.0.1:8000/v1/ask
  curl -F path=scene.tif -F question="Where is the ship?" http://127.0.0.1:8000/v1/ask   # under --allow-dir
  curl http://127.0.0.1:8000/healthz ; curl http://127.0.0.1:8000/metrics

POST /v1/ask takes a multipart form (image or path, question, task, label, bbox as
"LON_MIN,LAT_MIN,LON_MAX,LAT_MAX", date, anchors file, max_new_tokens, no_anchors, band) and returns
the JSON of `ask --json`. POST /v1/chat/completions takes OpenAI's chat format with the image as a
data: URL. Errors are JSON naming the field: 401 (token), 403 (path outside --allow-dir), 413
(body too large), 422 (bad field), 503 + Retry-After (queue full), 504 (timeout).
Ctrl-C / SIGTERM stops taking requests and finishes the ones admitted, waiting up to --timeout
(a request still sending its body then is cut off, and the log says so).
"""


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="answer questions over HTTP (/v1/ask, OpenAI /v1/chat/completions)",
                       description="Serve one bundle over HTTP with FastAPI + uvicorn. Loopback only unless --host "
                                   "says otherwise; a bearer token when --token-file is given.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--bundle", help="bundle directory or preset name (default: the built-in demo)")
    s.add_argument("--tiles", metavar="DIR", help="AEF tile store: georeferenced images get their anchors from it")
    s.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="torch (default) or onnxruntime (the bundle's onnx/ export)")
    add_device_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--token-file", metavar="FILE", help="file holding the bearer token clients must send (at least 16 characters)")
    s.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="a directory whose files the `path` field may name (repeatable; default: none, uploads only)")
    s.add_argument("--workers", type=int, default=2, help="questions answered at once (default 2)")
    s.add_argument("--threads", type=positive_int, help="backend threads per question (default: the physical cores this process "
                                                    "may use, within any container CPU quota, less those busy at start, / workers)")
    s.add_argument("--batch", type=int, default=1, metavar="N",
                   help="run up to N concurrent questions' images in one ViT call and decode those of one prompt "
                        "length together (default 1: off; more throughput, but a batched greedy answer can "
                        "differ at a near-tie)")
    s.add_argument("--max-queue", type=int, default=16, help="questions that may wait for a worker (default 16)")
    s.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request timeout (default 120 s)")
    s.add_argument("--max-upload-mb", type=float, default=64.0, help="largest request body (default 64 MB)")


def settings_from_args(args):
    """Everything checked before the model loads: a typo costs a second, not a model load."""
    from .serve.app import ServeSettings

    if not 0 < args.port < 65536:
        raise InputError(f"--port: expected 1..65535, got {args.port}")
    if args.workers < 1:
        raise InputError(f"--workers: expected a positive integer, got {args.workers}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue: expected 0 or more, got {args.max_queue}")
    if args.batch < 1:
        raise InputError(f"--batch: expected a positive integer, got {args.batch}")
    if args.batch > args.workers:
        raise InputError(f"--batch {args.batch}: needs at least as many --workers (got {args.workers}); each worker "
                         "brings one question to the batch")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise InputError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    if not (args.max_upload_mb > 0 and math.isfinite(args.max_upload_mb)):
        raise InputError(f"--max-upload-mb: expected a positive number, got {args.max_upload_mb}")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--token-file {args.token_file}: cannot be read ({exc})") from None
        if len(token) < 16:
            raise InputError(f"--token-file {args.token_file}: the token must be at least 16 characters")
    dirs = []
    for d in args.allow_dir:
        if not Path(d).is_dir():
            raise InputError(f"--allow-dir {d}: not a directory")
        dirs.append(Path(d))
    _check_port_free(args.host, args.port)
    return ServeSettings(token=token, allow_dirs=dirs, workers=args.workers, max_queue=args.max_queue,
                         timeout_s=args.timeout, max_upload_bytes=int(args.max_upload_mb * (1 << 20)))


def _check_port_free(host: str, port: int) -> None:
    """Bind the address once before the model loads: a busy port or a host that is not ours is
    one line now, not a uvicorn error after the load. (Another process can still take the port
    in between; uvicorn then reports it.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InputError(f"serve needs FastAPI and uvicorn ({exc.name} is missing): pip install "
                         "'fusar-edge[serve]'") from None
    from .runtime import Runtime
    from .serve.app import build_app

    settings = settings_from_args(args)
    if not _is_loopback(args.host) and settings.token is None:
        print(f"fusar-edge: warning: serving on {args.host} without --token-file: anyone who can reach the "
              "port can use the model", file=sys.stderr)
    from .threads import resolve_threads, set_torch_threads

    threads = resolve_threads(args.threads, share=args.workers)  # workers share the cores we may use
    if args.backend == "torch":  # the edge install has no torch; ONNX Runtime takes threads= below
        set_torch_threads(threads)  # workers share the cores instead of each taking all of them
    rt = Runtime.open(args.bundle, tiles=args.tiles, backend=args.backend, threads=threads, device=args.device,
                      dtype=args.dtype)
    if args.batch > 1:  # each worker hands its image to one vision thread, its sequence to one decode thread
        rt.enable_batching(max_batch=args.batch)
    app = build_app(rt, settings)
    print(f"serving {rt.source} ({rt.backend}, {settings.workers} workers x {threads} threads) on "
          f"http://{args.host}:{args.port} — Ctrl-C to stop", file=sys.stderr, flush=True)
    server = _quiet_stop_server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                             timeout_graceful_shutdown=args.timeout))
    server.run()
    # uvicorn has waited up to --timeout for the requests in flight (and logged any it cut off)
    print("fusar-edge: stopped", file=sys.stderr)
    return 0


def _quiet_stop_server(config):
    import uvicorn

    class QuietStopServer(uvicorn.Server):
        """uvicorn re-raises the SIGINT/SIGTERM it shut down for, which asyncio turns into a
        KeyboardInterrupt traceback after a clean stop; a graceful stop here is the end."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return QuietStopServer(config)
