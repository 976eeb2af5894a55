"""The chaos run of `benchmarks/chaos.py`, short: Redis with AOF on a free port, an API and two workers on the
demo model, a steady mix of submissions, readers that hang up and resume, cancels, one `kill -9` of a busy
worker and one Redis restart. Then every accepted job is completed or cancelled, every stream read back is
exact, there is no 5xx outside the outage, and the API's memory stayed bounded."""

from __future__ import annotations

from pathlib import Path

from benchmarks.chaos import Chaos, parse_args


def test_chaos_nothing_lost(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_args(
        [
            "--duration",
            "28",
            "--submit-every",
            "0.8",
            "--cancel-share",
            "0.25",
            "--no-replace",
            "--model-dir",
            str(demo_dir),
            "--start-timeout",
            "120",
            "--settle-timeout",
            "60",
            "--workdir",
            str(tmp_path),
        ]
    )
    f = Chaos(cfg).run()
    print("\n" + f.table())
    assert f.accepted >= 20
    assert f.worker_kills == 1 and f.redis_restarts == 1 and f.jobs_rerun >= 1  # the killed job ran again
    assert f.lost == 0 and f.succeeded + f.cancelled == f.accepted, f.problems[:10]
    assert f.streams_checked == f.accepted and f.streams_exact == f.accepted, f.problems[:10]
    assert f.resumes > 0
    assert f.http_5xx_outside_outage == 0 and not f.problems, f.problems[:10]
    assert f.api_rss_peak_mb - f.api_rss_start_mb <= 100
