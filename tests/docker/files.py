"""Reading the container files without a Docker engine: Dockerfile instructions, .dockerignore, compose."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
COMPOSE_WORKER = REPO / "docker" / "compose.worker.yaml"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text("utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form instruction (JSON array) or of a shell-form one (split like sh)."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text("utf-8"))


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} with the given environment ($$ is a literal $)."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    value = value.replace("$$", "\0")
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value).replace("\0", "$")


def dockerignore_rules(path: Path = REPO / ".dockerignore") -> list[tuple[bool, str]]:
    rules = []
    for line in path.read_text("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def _pattern(pattern: str) -> re.Pattern:
    """Docker's patternmatcher: `**` spans directories, `*` and `?` stay within one path segment."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_context(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether Docker sends `rel` (a path relative to the context): the last rule that matches it, or one of
    its parent directories, decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    keep = True
    for negate, pattern in rules:
        rx = _pattern(pattern)
        if any(rx.fullmatch(p) for p in prefixes):
            keep = negate
    return keep


def context_files(root: Path = REPO) -> set[str]:
    rules = dockerignore_rules(root / ".dockerignore")
    files = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if in_context(rel, rules):
                files.add(rel)
    return files
