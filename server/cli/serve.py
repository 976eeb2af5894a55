"""`irg serve`: the HTTP API. Alone it also runs one worker in this process, joined by the in-process queue,
on the demo model unless told otherwise (no Redis needed); with `--redis URL` it is an API replica only,
in front of `irg worker` processes."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from server.cli.common import add_model_options
from server.cli.errors import CommandError

log = logging.getLogger("server.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (with an embedded worker on the demo model by default)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1, IRG_HOST)")
    p.add_argument("--port", type=int, help="port to bind (default 8000, IRG_PORT)")
    p.add_argument("--redis", metavar="URL", help="use Redis (IRG_REDIS_URL): API only, jobs run by `irg worker`")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    add_model_options(p)
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace, **extra: Any) -> Any:
    from server.settings import Settings

    given = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
             "redis_url": getattr(args, "redis", None), **extra}
    return Settings(**{k: v for k, v in given.items() if v is not None})


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

    def load() -> Any:  # on the worker thread: torch loads while the API already answers
        from server.runner import EngineRunner

        return EngineRunner.open(model_args)

    queue = MemoryQueue(settings)
    return queue, WorkerThread(queue, settings, load, on_fatal)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from irg_core.defaults import DefaultsError
    from server.api.main import create_app
    from server.defaults import serving_defaults

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    settings = settings_from(args)
    servers: list[uvicorn.Server] = []
    queue, worker = None, None
    if settings.redis_url:
        if args.model_dir or args.dummy_weights:
            raise CommandError("--redis serves the API only; give the model to `irg worker --model-dir` (and its "
                               "serving defaults to the API with IRG_MODEL_DIR)")
    else:
        queue, worker = embedded_worker(args, settings, lambda: setattr(servers[0], "should_exit", True))
    try:  # the defaults of the model the workers run (docs/server.md); a bad file stops the start
        defaults = serving_defaults(args.model_dir or settings.model_dir, dummy=args.dummy_weights is not None,
                                    demo_when_unset=not settings.redis_url)
    except DefaultsError as e:
        raise CommandError(str(e)) from e
    log.info("request defaults from %s", defaults.source)
    app = create_app(settings, queue, [worker] if worker else [], defaults)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            access_log=not args.no_access_log, timeout_graceful_shutdown=10)
    servers.append(uvicorn.Server(config))
    log.info("serving on http://%s:%d (%s)", settings.host, settings.port,
             f"redis {settings.redis_url}" if settings.redis_url else "in-process queue and worker")
    servers[0].run()
    if worker is not None and worker.error is not None:
        raise CommandError(f"the worker could not load the model: {worker.error}")
    return 0
