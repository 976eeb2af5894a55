"""`irg serve`: the HTTP API. Alone it also runs one worker in this process, joined by the in-process queue,
on the demo model unless told otherwise (no Redis needed); with `--redis URL` it is an API replica only,
in front of `irg worker` processes."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
from typing import Any

from server.cli.common import add_model_options, check_attention
from server.cli.errors import CommandError

log = logging.getLogger("server.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (with an embedded worker on the demo model by default)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1, IRG_HOST)")
    p.add_argument("--port", type=int, help="port to bind (default 8000, IRG_PORT)")
    p.add_argument("--redis", metavar="URL", help="use Redis (IRG_REDIS_URL): API only, jobs run by `irg worker`")
    p.add_argument(
        "--max-active",
        type=int,
        help="jobs the embedded worker runs at once (IRG_MAX_ACTIVE; default 8 on CUDA, 2 on CPU)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    add_model_options(p)
    p.set_defaults(func=run)


# The flag each setting of `irg serve` / `irg worker` comes from, named in errors instead of its IRG_ variable.
FLAGS = {
    "host": "--host",
    "port": "--port",
    "redis_url": "--redis",
    "worker_name": "--name",
    "worker_metrics_port": "--metrics-port",
    "max_active": "--max-active",
}


def settings_from(args: argparse.Namespace, **extra: Any) -> Any:
    from server.settings import load_settings

    given = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "redis_url": getattr(args, "redis", None),
        "max_active": getattr(args, "max_active", None),
        **extra,
    }
    return load_settings(FLAGS, **{k: v for k, v in given.items() if v is not None})


def engine_args(args: argparse.Namespace, settings: Any) -> argparse.Namespace:
    """The model options, with IRG_MODEL_DIR / IRG_DEVICE filling what the command line left out."""
    if args.model_dir is None and args.dummy_weights is None and settings.model_dir is not None:
        args.model_dir = settings.model_dir
    if args.device is None:
        args.device = settings.device
    return args


def embedded_worker(args: argparse.Namespace, settings: Any, on_fatal: Any) -> tuple[Any, Any]:
    """The in-process queue and the worker thread that runs its jobs on the model the options name."""
    from server.queue.memory import MemoryQueue
    from server.worker import WorkerThread

    model_args = engine_args(args, settings)
    check_attention(model_args)  # before anything starts: a missing extra is named at once

    def load() -> Any:  # on the worker thread: torch loads while the API already answers
        from server.runner import EngineRunner

        return EngineRunner.open(model_args)

    queue = MemoryQueue(settings)
    return queue, WorkerThread(queue, settings, load, on_fatal)


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket, bound before anything starts: a port in use fails the command with one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise CommandError(f"cannot listen on {host}:{port}: the address does not resolve ({e.strerror})") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        hint = " (another server runs there: stop it or choose --port)" if e.errno == errno.EADDRINUSE else ""
        raise CommandError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from e
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from irg_core.defaults import DefaultsError
    from server.api.main import create_app
    from server.defaults import serving_defaults

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    settings = settings_from(args)
    if settings.redis_url and (args.model_dir or args.dummy_weights):
        raise CommandError("--redis serves the API only; give the model to `irg worker --model-dir`")
    sock = bind(settings.host, settings.port)
    servers: list[uvicorn.Server] = []
    queue, worker = None, None
    if not settings.redis_url:
        queue, worker = embedded_worker(args, settings, lambda: setattr(servers[0], "should_exit", True))
    try:  # the defaults of the model the workers run (docs/server.md); a bad file stops the start
        defaults = serving_defaults(
            args.model_dir or settings.model_dir,
            dummy=args.dummy_weights is not None,
            demo_when_unset=not settings.redis_url,
        )
    except DefaultsError as e:
        raise CommandError(str(e)) from e
    log.info("request defaults from %s", defaults.source)
    app = create_app(settings, queue, [worker] if worker else [], defaults)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=10,
    )
    servers.append(uvicorn.Server(config))
    host, port = sock.getsockname()[:2]
    log.info(
        "serving on http://%s:%d (%s)",
        f"[{host}]" if ":" in host else host,
        port,
        "redis" if settings.redis_url else "in-process queue and worker",
    )  # the URL may hold a password
    servers[0].run(sockets=[sock])
    if worker is not None and worker.error is not None:
        raise CommandError(f"the worker could not load the model: {worker.error}")
    return 0
