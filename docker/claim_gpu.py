#!/usr/bin/env python3
"""irg-claim-gpu COMMAND...: run COMMAND on a GPU of this machine that no other worker container holds.

`docker compose up --scale worker=N` starts N identical containers, and a `count: 1` GPU reservation hands
every one of them the same GPU (docker/compose#11863). So each worker container sees all GPUs, takes an
exclusive lock on one file per GPU in a directory the workers share (a volume, IRG_GPU_LOCK_DIR), sets
CUDA_VISIBLE_DEVICES to the GPU it got and execs COMMAND. The lock belongs to the open file, which COMMAND
inherits, so it is released exactly when the worker process exits, however it exits.

CUDA_VISIBLE_DEVICES already set: nothing is claimed. IRG_GPUS="0,1": claim among these indices only.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from pathlib import Path

DEFAULT_LOCK_DIR = "/var/lib/irg/gpu-locks"


def visible_gpus(env: dict[str, str], dev: Path = Path("/dev")) -> list[str]:
    """CUDA indices of the GPUs this container can use: IRG_GPUS, else one per /dev/nvidiaN node."""
    if env.get("IRG_GPUS"):
        return [g.strip() for g in env["IRG_GPUS"].split(",") if g.strip()]
    count = sum(1 for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
    return [str(i) for i in range(count)]


def claim(gpus: list[str], lock_dir: Path) -> tuple[str, int] | None:
    """The first GPU whose lock file this process could lock, and the open descriptor holding the lock."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        fd = os.open(lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} pid {os.getpid()}\n".encode())
        os.set_inheritable(fd, True)  # COMMAND keeps the lock
        return gpu, fd
    return None


def say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    if not argv:
        say("usage: irg-claim-gpu COMMAND [ARGS...]")
        return 2
    env = dict(os.environ)
    if not env.get("CUDA_VISIBLE_DEVICES"):
        gpus = visible_gpus(env)
        lock_dir = Path(env.get("IRG_GPU_LOCK_DIR", DEFAULT_LOCK_DIR))
        if not gpus:
            say("irg-claim-gpu: no GPU is visible in this container; running without one")
        else:
            got = claim(gpus, lock_dir)
            if got is None:
                say(
                    f"irg-claim-gpu: error: all {len(gpus)} GPUs of this machine are held by other workers "
                    f"(locks in {lock_dir}); run at most {len(gpus)} workers here"
                )
                return 1
            env["CUDA_VISIBLE_DEVICES"] = got[0]
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the same numbering in every container
            say(f"irg-claim-gpu: {os.uname().nodename} runs on GPU {got[0]} of {len(gpus)}")
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        say(f"irg-claim-gpu: error: cannot run {argv[0]}: {e.strerror}")
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
