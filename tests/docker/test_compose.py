"""docker/compose.yaml (Redis + API + scalable GPU workers) and docker/compose.worker.yaml (workers elsewhere)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from redis.connection import parse_url

from server.cli import build_parser
from tests.docker.files import COMPOSE, COMPOSE_WORKER, DOCKERFILE, REPO, exec_form, instructions, interpolate
from tests.docker.files import load_compose as load

HEAD = load(COMPOSE)
REMOTE = load(COMPOSE_WORKER)
SERVICES = HEAD["services"]
STUBS = {"serve", "worker"}  # sub-commands still being built on the server branch (help text "(being built)")


def test_services() -> None:
    assert set(SERVICES) == {"redis", "api", "worker", "weights"}
    assert set(REMOTE["services"]) == {"worker", "weights"}
    for doc in (HEAD, REMOTE):
        used = {interpolate(v).split(":")[0] for s in doc["services"].values() for v in s.get("volumes", [])}
        named = {v for v in used if not v.startswith(("/", "."))}
        assert named <= set(doc["volumes"]), named - set(doc["volumes"])


def test_redis() -> None:
    redis = SERVICES["redis"]
    name, _, tag = redis["image"].partition(":")
    assert name == "redis" and tag and tag != "latest"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "redis-data:/data" in redis["volumes"]
    assert interpolate(redis["ports"][0]) == "127.0.0.1:6379:6379"  # only this machine unless IRG_REDIS_BIND
    assert interpolate(redis["ports"][0], {"IRG_REDIS_BIND": "10.0.0.5"}) == "10.0.0.5:6379:6379"


@pytest.mark.parametrize(
    ("password", "expected"), [("", "--appendonly yes"), ("s3cret", "--appendonly yes --requirepass s3cret")]
)
def test_redis_password_is_optional(password: str, expected: str) -> None:
    argv = SERVICES["redis"]["command"]
    assert argv[:2] == ["sh", "-c"]
    script = interpolate(argv[2], {"IRG_REDIS_PASSWORD": password}).replace("exec redis-server", "echo")
    out = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"IRG_REDIS_PASSWORD": password, "PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    assert out == expected


def test_api() -> None:
    api = SERVICES["api"]
    assert api["ports"] == ["${IRG_API_PORT:-8000}:8000"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    argv = api["command"]
    assert argv[:2] == ["irg", "serve"] and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--redis") + 1] == api["environment"]["IRG_REDIS_URL"]


def test_worker_scales_on_gpus() -> None:
    worker = SERVICES["worker"]
    for fixed in ("container_name", "hostname", "ports"):
        assert fixed not in worker  # replicas of --scale worker=N would collide
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    # every replica sees every GPU; irg-claim-gpu pins each to a free one (a `count: 1` would pin all to one)
    assert device["count"] == "all"
    assert worker["entrypoint"] == ["irg-claim-gpu"]
    assert "gpu-locks:/var/lib/irg/gpu-locks" in worker["volumes"]
    assert "${IRG_MODELS:-models}:/models:ro" in worker["volumes"]
    assert worker["healthcheck"] == {"disable": True}
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    argv = worker["command"]
    assert argv[:2] == ["irg", "worker"]
    assert argv[argv.index("--model-dir") + 1] == worker["environment"]["IRG_MODEL_DIR"] == "/models/bagel-7b-mot"
    assert argv[argv.index("--redis") + 1] == worker["environment"]["IRG_REDIS_URL"]
    assert re.fullmatch(r"\d+m", worker["stop_grace_period"])


@pytest.mark.parametrize(("env", "password"), [({}, None), ({"IRG_REDIS_PASSWORD": "s3cret"}, "s3cret")])
def test_redis_url(env: dict[str, str], password: str | None) -> None:
    url = interpolate(SERVICES["worker"]["environment"]["IRG_REDIS_URL"], env)
    kwargs = parse_url(url)
    assert (kwargs["host"], kwargs.get("port"), kwargs.get("db"), kwargs.get("password")) == (
        "redis",
        6379,
        0,
        password,
    )


def test_remote_worker_is_the_same_worker() -> None:
    head, remote = dict(SERVICES["worker"]), dict(REMOTE["services"]["worker"])
    head.pop("depends_on")
    url = "${IRG_REDIS_URL:?set IRG_REDIS_URL to the head's Redis, e.g. redis://:PASSWORD@head:6379/0}"
    assert remote["environment"]["IRG_REDIS_URL"] == url
    assert remote["command"][remote["command"].index("--redis") + 1] == url
    for service in (head, remote):
        service["environment"] = {**service["environment"], "IRG_REDIS_URL": "X"}
        service["command"] = ["X" if a.startswith("redis://") or a == url else a for a in service["command"]]
    assert head == remote
    assert REMOTE["services"]["weights"] == SERVICES["weights"]
    with pytest.raises(KeyError, match="IRG_REDIS_URL"):
        interpolate(url)
    assert parse_url(interpolate(url, {"IRG_REDIS_URL": "redis://:pw@10.0.0.5:6379/0"}))["host"] == "10.0.0.5"


def test_weights_tool() -> None:
    weights = SERVICES["weights"]
    assert weights["profiles"] == ["tools"]  # not started by `up`
    assert weights["command"] == ["irg", "weights", "download", "bagel-7b-mot", "/models/bagel-7b-mot"]
    assert "${IRG_MODELS:-models}:/models" in weights["volumes"]  # writable, unlike the workers' mount


def test_one_image_for_all() -> None:
    images = {s["image"] for doc in (HEAD, REMOTE) for s in doc["services"].values() if "build" in s}
    assert images == {"${IRG_IMAGE:-irg-server:latest}"}
    for doc in (HEAD, REMOTE):
        for s in doc["services"].values():
            if "build" in s:
                assert s["build"] == {"context": "..", "dockerfile": "Dockerfile"}
                assert (COMPOSE.parent / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DOCKERFILE


def irg_commands() -> list[list[str]]:
    """Every `irg ...` command line the container files and docs/deploy.md use, interpolated with defaults."""
    cmds = [exec_form(a) for k, a in instructions() if k == "CMD"]
    cmds += [
        s["command"] for doc in (HEAD, REMOTE) for s in doc["services"].values() if s.get("command", [""])[0] == "irg"
    ]
    env = {"IRG_REDIS_URL": "redis://head:6379/0"}
    cmds = [[interpolate(a, env) for a in c] for c in cmds]
    docs = (REPO / "docs" / "deploy.md").read_text("utf-8")
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", docs, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "irg " in line and not line.lstrip().startswith("#"):
                argv = line.split()
                tail = argv[argv.index("irg") :] if "irg" in argv else []
                if tail:
                    cmds.append([re.sub(r"<[^>]+>", "x", a) for a in tail])
    return cmds


def _subcommand_help() -> dict[str, str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help or "" for a in action._choices_actions}


def test_every_irg_command_exists() -> None:
    """Each command names a sub-command of `irg --help`; built sub-commands also accept all its options."""
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    listed = set(re.findall(r"^    ([\w-]+)  ", out, re.M))
    assert {"serve", "worker", "weights"} <= listed
    helps = _subcommand_help()
    stubs = {name for name, text in helps.items() if "being built" in text}
    assert stubs <= STUBS  # a new stub would hide its options from this test
    cmds = irg_commands()
    assert len(cmds) >= 6
    for argv in cmds:
        assert argv[0] == "irg" and argv[1] in listed, argv
        if argv[1] not in stubs:
            build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown option or choice
