"""The README does not drift from the code: every command in it is run here or by .ci/run.

- the two set-up commands are the ones `.ci/run` runs (`docs/commands/test.sh`) and the one whose `irg serve`
  these tests start (`docs/commands/serve.sh`);
- every `irg ...` line parses with the real command-line parser, and the quick ones run;
- the shell block of HTTP examples and the Python `openai` example run against a live `irg serve`;
- the configuration and metrics references list exactly what the code defines.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO
from tests.web.conftest import Server, start_server, stop_server

README = (REPO / "README.md").read_text("utf-8")
LIVE = "http://127.0.0.1:8000"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_lines() -> list[str]:
    """Commands of the README's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(line)
    return out


def irg_commands() -> list[list[str]]:
    commands = []
    for line in shell_lines():
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words and words[0] == "irg":
                commands.append(words[1:])
    return commands


def test_setup_commands_are_what_ci_and_the_tests_run() -> None:
    for name in ("serve.sh", "test.sh"):
        command = [
            line
            for line in (REPO / "docs" / "commands" / name).read_text().splitlines()
            if line and not line.startswith("#")
        ]
        assert len(command) == 1 and command[0] in shell_lines(), name
    assert "docs/commands/test.sh" in (REPO / ".ci" / "run").read_text()


def test_every_irg_command_parses() -> None:
    from server.cli import build_parser

    commands = irg_commands()
    assert {c[0] for c in commands} >= {"serve", "generate", "bench", "weights", "worker"}
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit as e:  # argparse exits on unknown options or values
            raise AssertionError(f"README command does not parse: irg {shlex.join(args)}") from e


def test_generate_and_bench_examples_run(tmp_path: Path, demo_dir: Path) -> None:
    for args in irg_commands():
        if args[0] not in ("generate", "bench"):
            continue
        # generate on the demo checkpoint; bench as written (a packaged config by name): both outside the checkout.
        # Both shortened to 4 steps (and bench to 8-token thoughts; the options given last win): what this checks
        # is that the lines run and write what the README says, not how long 20 steps take.
        short = ["--steps", "4"] + (["--max-think-tokens", "8"] if args[0] == "bench" else [])
        extra = ["--model-dir", str(demo_dir)] if args[0] == "generate" else ["--repeats", "1", "--no-warmup"]
        extra += short
        cwd = tmp_path
        p = subprocess.run(
            [sys.executable, "-m", "server.cli", *args, *extra],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert p.returncode == 0, (args, p.stderr[-2000:])
    assert Image.open(tmp_path / "out" / "round-2.png").size == (256, 256)


def test_configuration_reference_is_complete() -> None:
    from server.settings import Settings

    documented = set(re.findall(r"^\| `(IRG_[A-Z_]+)` \|", README, flags=re.M))
    defined = {f"IRG_{name.upper()}" for name in Settings.model_fields} | {"IRG_HOME"}
    assert documented == defined
    for name, field in Settings.model_fields.items():
        row = re.search(rf"^\| `IRG_{name.upper()}` \| ([^|]+) \|", README, flags=re.M)
        assert row is not None
        default = field.get_default(call_default_factory=True)
        shown = row.group(1).strip()
        assert shown == ("—" if default in (None, []) else str(default)), (name, shown, default)


def test_metrics_reference_is_complete() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from server import metrics

    names = {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    assert names
    for name in names:
        assert f"`{name}" in README or f"`{name}_total" in README, name


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("readme-home"), "readme")
    yield server
    stop_server(server)


def test_http_examples_run(live: Server, tmp_path: Path) -> None:
    block = next(b for b in blocks("bash") if "JOB=$(curl" in b)
    script = "set -euo pipefail\n" + block.replace(LIVE, live.url)
    script += f"curl -s -X DELETE {live.url}/v1/generations/$JOB -o /dev/null -w '%{{http_code}}'\n"
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    events = re.findall(r"^event: (\S+)$", p.stdout, flags=re.M)
    assert events[0] == "queued" and events[-1] == "completed"
    assert {"thinking.done", "reflection.done", "image.done"} <= set(events)
    # one line per stage in the terminal, not one per piece of text or denoising step
    assert events == [
        "queued",
        "started",
        "thinking.done",
        "image.done",
        "reflection.done",
        "image.done",
        "completed",
    ], events
    assert Image.open(tmp_path / "final.png").size == (256, 256)


def test_openai_example_runs(live: Server, tmp_path: Path) -> None:
    (code,) = blocks("python")
    p = subprocess.run(
        [sys.executable, "-c", code.replace(LIVE, live.url)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["image_generation.partial_image", "image_generation.completed"]
    assert Image.open(tmp_path / "lighthouse.png").size == (256, 256)


def test_install_extras_exist_and_links_stay_inside_the_repository() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["optional-dependencies"]
    named = set()
    for line in shell_lines():
        for group in re.findall(r'pip install -e "\.\[([a-z,]+)\]"', line):
            named |= set(group.split(","))
    assert {"openai", "test"} <= named and named <= set(extras), named
    assert any(dep.startswith("openai") for dep in extras["openai"])
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert "docs/api.md" in links
    for link in links:
        if not link.startswith(("http://", "https://")):
            target = (REPO / link).resolve()
            assert target.is_relative_to(REPO) and target.exists(), link
