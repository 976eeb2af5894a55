"""`irg weights download`: the plan, the no-network errors, and the whole flow against a fake Hub.

Nothing here reaches the network: subprocesses point HF_ENDPOINT at a closed loopback port or set
HF_HUB_OFFLINE, and in-process tests replace the two huggingface_hub calls.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import errors as hf_errors

from tests.weights import damage
from weights import fetch

BAGEL = fetch.known_models()["bagel-7b-mot"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_manifest() -> None:
    assert BAGEL.repo_id == "ByteDance-Seed/BAGEL-7B-MoT"
    assert set(BAGEL.files) == {
        "llm_config.json",
        "vit_config.json",
        "ema.safetensors",
        "ae.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_manifest_is_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((damage.REPO / "pyproject.toml").read_text("utf-8"))
    assert "*.json" in pyproject["tool"]["setuptools"]["package-data"]["weights"]


def test_plan_fresh_dir(tmp_path: Path) -> None:
    sizes = {"a.json": 10, "b.safetensors": 1000, "README.md": 5}
    plan = fetch.plan_download(("a.json", "b.safetensors"), sizes, tmp_path / "new")
    assert plan == fetch.Plan(("a.json", "b.safetensors"), (), (), 1010, 1010)


def test_plan_counts_complete_files_only(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"x" * 10)
    (tmp_path / "b.safetensors").write_bytes(b"x" * 400)  # partial or stale: same name, wrong size
    plan = fetch.plan_download(("a.json", "b.safetensors", "c.txt"), {"a.json": 10, "b.safetensors": 1000}, tmp_path)
    assert plan.files == ("a.json", "b.safetensors")
    assert plan.present == ("a.json",)
    assert plan.missing_remote == ("c.txt",)
    assert (plan.total_bytes, plan.fetch_bytes) == (1010, 1000)


def test_partial_bytes(tmp_path: Path) -> None:
    folder = tmp_path / ".cache" / "huggingface" / "download"
    folder.mkdir(parents=True)
    (folder / "abc.etag.incomplete").write_bytes(b"x" * 300)
    assert fetch.partial_bytes(tmp_path) == 300
    assert fetch.partial_bytes(tmp_path / "none") == 0


def test_check_space(tmp_path: Path) -> None:
    fetch.check_space(tmp_path / "a" / "b", 1)
    with pytest.raises(fetch.DownloadError, match=r"free, the download needs"):
        fetch.check_space(tmp_path / "a" / "b", shutil.disk_usage(tmp_path).free * 10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "", **extra}


def assert_one_line_error(r, dest: Path) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == ""
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("irg weights: error: cannot reach ")
    assert line.endswith(f"copy them into {dest}, then run irg weights verify {dest}")
    assert "ema.safetensors" in line and "ByteDance-Seed/BAGEL-7B-MoT" in line
    assert not dest.exists()  # nothing is written before the Hub answered
    return line


def test_no_network_closed_port(tmp_path: Path) -> None:
    port = closed_port()
    dest = tmp_path / "bagel"
    r = damage.run_irg(
        "weights",
        "download",
        "bagel-7b-mot",
        str(dest),
        env=hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="0"),
        timeout=60,
    )
    line = assert_one_line_error(r, dest)
    assert f"cannot reach 127.0.0.1:{port} (Connection refused)" in line


def test_no_network_offline_mode(tmp_path: Path) -> None:
    dest = tmp_path / "bagel"
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="https://huggingface.co")
    r = damage.run_irg("weights", "download", str(dest), env=env, timeout=60)
    line = assert_one_line_error(r, dest)
    assert "cannot reach huggingface.co (HF_HUB_OFFLINE is set)" in line


class FakeHub:
    """model_info + snapshot_download over a local folder, recording what was asked."""

    def __init__(self, source: Path, files: list[str] | None = None):
        self.source, self.calls = source, []
        self.files = files if files is not None else [p.name for p in source.iterdir()] + ["README.md"]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        import huggingface_hub

        hub = self

        class Api:
            def model_info(self, repo_id: str, revision: str | None = None, **kwargs: object) -> SimpleNamespace:
                hub.calls.append(("model_info", repo_id, revision))
                sizes = {f: (hub.source / f).stat().st_size if (hub.source / f).exists() else 5 for f in hub.files}
                siblings = [SimpleNamespace(rfilename=f, size=s) for f, s in sizes.items()]
                return SimpleNamespace(sha=COMMIT, siblings=siblings)

        def snapshot_download(
            repo_id: str, *, revision: str, allow_patterns: list[str], local_dir: Path, tqdm_class: object
        ) -> str:
            hub.calls.append(("snapshot_download", repo_id, revision, sorted(allow_patterns)))
            for name in allow_patterns:
                shutil.copyfile(hub.source / name, Path(local_dir) / name)
            return str(local_dir)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return self


def test_download_then_verify(
    golden_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    hub = FakeHub(golden_model).install(monkeypatch)
    dest = tmp_path / "bagel"
    assert main(["weights", "download", str(dest)]) == 1  # the download worked, the verification did not
    out, err = capsys.readouterr()
    assert hub.calls == [
        ("model_info", BAGEL.repo_id, "main"),
        ("snapshot_download", BAGEL.repo_id, COMMIT, sorted(BAGEL.files)),
    ]
    assert sorted(p.name for p in dest.iterdir()) == sorted(BAGEL.files)  # not README.md, not ae_config.json
    assert f"ByteDance-Seed/BAGEL-7B-MoT@{COMMIT}: 8 files" in err and "0 already complete" in err
    assert f"bagel-7b-mot: ByteDance-Seed/BAGEL-7B-MoT@{COMMIT} is in {dest}" in out
    # the golden's tiny VAE needs its ae_config.json, which no real repository has: verify says so
    assert "ae.safetensors: missing tensor" in out and out.rstrip().endswith("problems found")

    shutil.copyfile(golden_model / "ae_config.json", dest / "ae_config.json")
    assert main(["weights", "download", "bagel-7b-mot", str(dest), "--revision", COMMIT]) == 0
    out, err = capsys.readouterr()
    assert "8 already complete" in err and "0 bytes to fetch" in err
    assert out.rstrip().endswith("ok: no problems found")
    assert hub.calls[-2] == ("model_info", BAGEL.repo_id, COMMIT)


def test_download_failed_verify_exit_1(
    golden_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    source = Path(shutil.copytree(golden_model, tmp_path / "hub", copy_function=shutil.copyfile))
    damage.truncate(source / "ema.safetensors")
    FakeHub(source).install(monkeypatch)
    assert main(["weights", "download", str(tmp_path / "bagel")]) == 1
    assert "problem: ema.safetensors: truncated" in capsys.readouterr().out
    assert main(["weights", "download", "--no-verify", str(tmp_path / "bagel2")]) == 0


def test_repository_without_a_needed_file(
    golden_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    files = [f for f in BAGEL.files if f != "ema.safetensors"]
    hub = FakeHub(golden_model, files).install(monkeypatch)
    assert main(["weights", "download", "--repo", "someone/copy", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"irg weights: error: someone/copy@{COMMIT}: the repository has no ema.safetensors"
    assert [c[0] for c in hub.calls] == ["model_info"]


def _raise(exc: BaseException):
    def call() -> None:
        raise exc

    return call


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/a/b"))


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            hf_errors.RepositoryNotFoundError("Repository Not Found", response=_response(404)),
            "huggingface.co: repository a/b is not found or not accessible "
            "(a private or gated repository needs HF_TOKEN)",
        ),
        (
            hf_errors.GatedRepoError("gated", response=_response(403)),
            "huggingface.co: repository a/b is gated (a private or gated repository needs HF_TOKEN)",
        ),
        (
            hf_errors.RevisionNotFoundError("Revision Not Found for url", response=_response(404)),
            "huggingface.co: a/b has no such revision (Revision Not Found for url)",
        ),
        (
            hf_errors.HfHubHTTPError("Server Error\nmore", response=_response(503)),
            "huggingface.co answered HTTP 503 (Server Error)",
        ),
        (httpx2.ReadTimeout("timed out"), "cannot reach huggingface.co (timed out); download x.json from a/b"),
    ],
)
def test_hub_errors_become_one_line(
    exc: BaseException, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    with pytest.raises(fetch.DownloadError) as e:
        fetch.hub_call(_raise(exc), "a/b", ("x.json",), tmp_path)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_interrupted_download_says_how_to_resume(tmp_path: Path) -> None:
    exc = hf_errors.XetDownloadError("connection reset by peer")
    with pytest.raises(fetch.DownloadError, match=r"run the same command again to resume"):
        fetch.hub_call(_raise(exc), "a/b", ("x.json",), tmp_path, during_download=True)
