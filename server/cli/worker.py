"""`irg worker --redis URL --model-dir DIR`: one GPU worker process. It loads the model once, warms up, then
announces itself and runs jobs from Redis until SIGTERM (drain) or a second signal (hand the job back)."""

from __future__ import annotations

import argparse
import logging
import signal

from server.cli.common import add_model_options, check_attention
from server.cli.errors import CommandError
from server.cli.serve import LOG_FORMAT, engine_args, settings_from

log = logging.getLogger("server.worker")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run jobs from Redis on this machine's accelerator (one process per GPU)")
    p.add_argument("--redis", metavar="URL", help="the queue (IRG_REDIS_URL)")
    p.add_argument("--name", help="worker name in heartbeats (default: host-pid, IRG_WORKER_NAME)")
    p.add_argument(
        "--metrics-port", type=int, help="serve this worker's /metrics on this port (IRG_WORKER_METRICS_PORT)"
    )
    p.add_argument(
        "--max-active", type=int, help="jobs this worker runs at once (IRG_MAX_ACTIVE; default 8 on CUDA, 2 on CPU)"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from server import metrics
    from server.queue.durability import check_sync
    from server.queue.redis import RedisWorkerQueue

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    settings = settings_from(args, worker_name=args.name, worker_metrics_port=args.metrics_port)
    if not settings.redis_url:
        raise CommandError("a worker needs the queue: --redis URL (or IRG_REDIS_URL)")
    queue = RedisWorkerQueue(settings)
    try:
        queue.r.ping()
    except Exception as e:
        raise CommandError(f"redis {settings.redis_url} is unreachable: {e}") from e
    check_sync(queue.r, "worker")
    check_attention(args)
    from server.runner import EngineRunner  # torch: after what can be checked in a second
    from server.worker import Worker

    if settings.worker_metrics_port is not None:
        start_http_server(settings.worker_metrics_port, registry=metrics.Exposition("worker"))
    worker = Worker(queue, settings)
    log.info("worker=%s loading the model", worker.name)
    runner = EngineRunner.open(engine_args(args, settings))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.request_stop())
    worker.start(runner)
    try:
        worker.run()
    finally:
        worker.close()
        queue.close()
    log.info("worker=%s stopped", worker.name)
    return 0
