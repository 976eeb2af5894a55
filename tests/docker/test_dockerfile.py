"""The GPU Dockerfile, checked without a Docker engine: what it installs, who runs it, what it exposes."""

from __future__ import annotations

import re
import shlex
import tomllib

from tests.docker.files import DOCKERFILE, REPO, context_files, dockerignore_rules, exec_form, in_context, instructions

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))


def _all(keyword: str) -> list[str]:
    return [args for k, args in instructions() if k == keyword]


def _index(keyword: str) -> int:
    return [k for k, _ in instructions()].index(keyword)


def test_base_image_has_the_pinned_torch() -> None:
    [arg] = [a for a in _all("ARG") if a.startswith("BASE_IMAGE=")]
    image = arg.removeprefix("BASE_IMAGE=")
    assert _all("FROM") == ["${BASE_IMAGE}"]
    repo, tag = image.split(":")
    assert repo == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag)
    [torch_pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    low = re.search(r">=\s*(\d+\.\d+)", torch_pin).group(1)
    high = re.search(r"<\s*(\d+\.\d+)", torch_pin).group(1)
    version = tuple(int(x) for x in tag.split("-")[0].split(".")[:2])
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split("."))), (tag, torch_pin)


def test_installs_the_repository_package_and_nothing_else() -> None:
    """The same package CI installs: `pip install .` of this pyproject, no requirement files or extra names."""
    installs = [step for args in _all("RUN") for step in args.split("&&") if "pip" in step]
    assert [shlex.split(s) for s in installs] == [["pip", "install", "."]]
    assert not any(re.search(r"\b(apt-get|apt|conda|mamba)\b", args) for args in _all("RUN"))
    [copy_all] = [a for a in _all("COPY") if a.split() == [".", "."]]
    assert copy_all  # the whole (filtered) context, so the pyproject sees all its packages


def test_build_context_holds_what_pip_install_needs() -> None:
    files = context_files()
    assert "pyproject.toml" in files
    assert in_context(PYPROJECT["project"]["readme"], dockerignore_rules())  # sent whenever it exists
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        top = pattern.rstrip("*")
        sources = {
            p.relative_to(REPO).as_posix()
            for p in (REPO / top).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        assert sources and sources <= files, sorted(sources - files)
    for source in (a.split()[0] for a in _all("COPY") if not a.startswith("--")):
        assert source == "." or source in files, source
    assert not any(f.startswith(("tests/", ".git", "docs/")) or f.endswith((".safetensors", ".pyc")) for f in files)


def test_runs_as_a_non_root_user() -> None:
    users = _all("USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    assert _index("USER") > max(i for i, (k, a) in enumerate(instructions()) if k == "RUN")
    assert _index("USER") < _index("CMD")
    assert "useradd" in " ".join(_all("RUN")) and users[-1] in " ".join(_all("RUN"))


def test_healthcheck_hits_healthz() -> None:
    [check] = _all("HEALTHCHECK")
    options, _, command = check.partition("CMD")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command.strip())
    assert argv[0] == "python" and "http://127.0.0.1:8000/healthz" in argv[-1]
    assert "8000" in _all("EXPOSE")


def test_weights_are_a_volume() -> None:
    assert any("/models" in exec_form(v) for v in _all("VOLUME"))
    env = " ".join(_all("ENV"))
    assert "IRG_MODEL_DIR=/models/bagel-7b-mot" in env
    assert not any(".safetensors" in a for a in _all("COPY") + _all("ADD"))


def test_default_command_is_irg_serve() -> None:
    [cmd] = _all("CMD")
    assert exec_form(cmd)[:2] == ["irg", "serve"]
    assert cmd.startswith("[")  # exec form: signals reach irg, not a shell


def test_gpu_claim_entrypoint_is_installed() -> None:
    assert "docker/claim_gpu.py /usr/local/bin/irg-claim-gpu" in _all("COPY")
    assert "chmod 0755 /usr/local/bin/irg-claim-gpu" in " ".join(_all("RUN"))
    assert "IRG_GPU_LOCK_DIR=/var/lib/irg/gpu-locks" in " ".join(_all("ENV"))


def test_instruction_parser() -> None:
    assert DOCKERFILE.is_file()
    assert {k for k, _ in instructions()} <= {
        "ARG",
        "FROM",
        "ENV",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "VOLUME",
        "EXPOSE",
        "HEALTHCHECK",
        "CMD",
    }


def test_dockerignore_matcher() -> None:
    rules = [(False, "*"), (True, "pkg"), (False, "**/__pycache__"), (False, "**/*.pyc"), (True, "docker/x.py")]
    assert in_context("pkg/a/b.py", rules)
    assert not in_context("pkg/a/__pycache__/b.cpython-311.pyc", rules)
    assert not in_context("pkg/c.pyc", rules)
    assert not in_context("tests/test_a.py", rules)
    assert in_context("docker/x.py", rules) and not in_context("docker/compose.yaml", rules)
