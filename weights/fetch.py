"""`irg weights download [MODEL] DIR`: fetch only the files the engine reads from the Hugging Face Hub.

`huggingface_hub.snapshot_download(local_dir=DIR)` does the transfer: it keeps finished files, resumes
partial ones (kept under `DIR/.cache/huggingface/`) and shows a progress bar. Before it runs, one metadata
call lists the repository, so a missing network, an unknown repository or a full disk is reported as one
line before anything is written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
METADATA_TIMEOUT_S = 30


class DownloadError(Exception):
    """The download cannot start or did not finish; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    repo_id: str
    revision: str
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    files: tuple[str, ...]  # what to ask snapshot_download for
    present: tuple[str, ...]  # already in DIR with the size the Hub lists
    missing_remote: tuple[str, ...]  # named by the manifest but absent from the repository
    total_bytes: int
    fetch_bytes: int  # what is not complete in DIR yet


def known_models() -> dict[str, ModelEntry]:
    data = json.loads(resources.files("weights").joinpath("manifest.json").read_text("utf-8"))
    return {
        name: ModelEntry(name, m["repo_id"], m["revision"], tuple(m["files"])) for name, m in data["models"].items()
    }


def plan_download(files: tuple[str, ...], remote_sizes: dict[str, int | None], dest: Path) -> Plan:
    """What a download into `dest` has to do, given the repository's file sizes (None = unknown)."""
    missing_remote = tuple(f for f in files if f not in remote_sizes)
    wanted = tuple(f for f in files if f in remote_sizes)
    present = tuple(
        f
        for f in wanted
        if remote_sizes[f] is not None and (dest / f).is_file() and (dest / f).stat().st_size == remote_sizes[f]
    )
    total = sum(remote_sizes[f] or 0 for f in wanted)
    fetch = sum(remote_sizes[f] or 0 for f in wanted if f not in present)
    return Plan(wanted, present, missing_remote, total, fetch)


def partial_bytes(dest: Path) -> int:
    """Bytes of interrupted downloads that snapshot_download will resume."""
    folder = dest / ".cache" / "huggingface" / "download"
    return sum(p.stat().st_size for p in folder.rglob("*.incomplete")) if folder.is_dir() else 0


def check_space(dest: Path, need: int) -> None:
    existing = next(p for p in (dest, *dest.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise DownloadError(f"{existing} has {human_bytes(free)} free, the download needs {human_bytes(need)}")


def download(
    entry: ModelEntry,
    dest: Path,
    revision: str | None = None,
    repo_id: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Download `entry`'s files into `dest`; returns the commit that was fetched."""
    from huggingface_hub import HfApi, snapshot_download
    from tqdm.auto import tqdm

    repo, rev = repo_id or entry.repo_id, revision or entry.revision
    info = hub_call(
        lambda: HfApi().model_info(repo, revision=rev, files_metadata=True, timeout=METADATA_TIMEOUT_S),
        repo,
        entry.files,
        dest,
    )
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    plan = plan_download(entry.files, sizes, dest)
    if plan.missing_remote:
        raise DownloadError(f"{repo}@{info.sha}: the repository has no {', '.join(plan.missing_remote)}")
    check_space(dest, plan.fetch_bytes - partial_bytes(dest))
    log(
        f"{repo}@{info.sha}: {len(plan.files)} files, {human_bytes(plan.total_bytes)}; "
        f"{len(plan.present)} already complete in {dest}, {human_bytes(plan.fetch_bytes)} to fetch"
    )
    dest.mkdir(parents=True, exist_ok=True)
    hub_call(
        lambda: snapshot_download(
            repo, revision=info.sha, allow_patterns=list(plan.files), local_dir=dest, tqdm_class=tqdm
        ),
        repo,
        plan.files,
        dest,
        during_download=True,
    )
    return str(info.sha)


def hub_call(call: Callable[[], T], repo: str, files: tuple[str, ...], dest: Path, during_download: bool = False) -> T:
    """Run a huggingface_hub call, turning its network and HTTP errors into one DownloadError line."""
    import httpx2  # huggingface_hub's HTTP client (a dependency of huggingface_hub 2.x)
    from huggingface_hub import constants, errors

    host = urlparse(constants.ENDPOINT).netloc or constants.ENDPOINT
    resume = " (finished files are kept; run the same command again to resume)" if during_download else ""
    try:
        return call()
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        kind = "gated" if isinstance(e, errors.GatedRepoError) else "not found or not accessible"
        raise DownloadError(
            f"{host}: repository {repo} is {kind} (a private or gated repository needs HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError as e:
        raise DownloadError(f"{host}: {repo} has no such revision ({first_line(e)})") from None
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, httpx2.TransportError) as e:
        raise DownloadError(
            f"cannot reach {host} ({reason(e)}){resume}; download {', '.join(files)} "
            f"from {repo} elsewhere, copy them into {dest}, then run "
            f"irg weights verify {dest}"
        ) from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise DownloadError(f"{host} answered HTTP {status} ({first_line(e)}){resume}") from None
    except errors.XetDownloadError as e:
        raise DownloadError(f"download failed ({first_line(e)}){resume}") from None


def reason(e: BaseException) -> str:
    """The root cause of a connection failure, in a few words."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(c, OfflineModeIsEnabled) for c in chain):
        return "HF_HUB_OFFLINE is set"
    root: Any = chain[-1]
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return first_line(root) or type(root).__name__


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
