"""The scheduler: many trajectories at once give what each gives alone; packing, admission, cancellation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from irg_core.engine import Engine
from irg_core.loader import load_model
from irg_core.params import GenerationParams, ParamError
from irg_core.programs import prepare
from irg_core.scheduler import CANCELLED, DONE, Scheduler
from irg_core.trajectory import run_trajectory


@pytest.fixture(scope="module")
def engine(golden_dir: Path) -> Engine:
    return Engine(load_model(golden_dir / "model", device="cpu"), page_size=16)


def params(**kw) -> GenerationParams:
    base = dict(prompt="A red apple on a wooden table.", width=64, height=48, steps=5, seed=7, max_think_tokens=8)
    return GenerationParams(**{**base, **kw})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_a_trajectory_beside_three_others_gives_what_it_gives_alone(engine: Engine) -> None:
    mine = params(temperature=0.3)
    others = [
        params(prompt="Ein Leuchtturm in der Dämmerung", mode="think", width=80, height=32, seed=3),
        params(prompt="A cat", mode="direct", width=32, height=32, seed=5, steps=8),
        params(prompt="A very long reflection about a tree", rounds=3, seed=9, max_think_tokens=12),
    ]
    alone = run_trajectory(engine, mine, keep_tensors=True)
    others_alone = [run_trajectory(engine, p, keep_tensors=True) for p in others[:2]]

    forwards: list[tuple[str, int]] = []
    s = Scheduler(engine, max_active=4, on_forward=lambda kind, rows: forwards.append((kind, rows)))
    seen = {"progress": 0}

    def cancel_half_way() -> bool:  # the fourth job is cancelled in its first image round
        return seen["progress"] >= 2

    def count(event) -> None:
        if event.type == "image.progress":
            seen["progress"] += 1

    jobs = []
    for i, p in enumerate([mine, *others]):
        program, pages = prepare(engine, p, keep_tensors=True)
        last = i == 3
        jobs.append(
            s.submit(program, pages, sink=count if last else None, should_cancel=cancel_half_way if last else None)
        )
    s.run(jobs)
    assert [j.status for j in jobs] == [DONE, DONE, DONE, CANCELLED]
    for result, ref in [(jobs[0].result, alone), (jobs[1].result, others_alone[0]), (jobs[2].result, others_alone[1])]:
        assert [r.token_ids for r in result.rounds] == [r.token_ids for r in ref.rounds]
        for key, value in ref.tensors.items():
            if key.endswith("final_latent"):
                assert rel(result.tensors[key], value) <= 1e-5, key
        for r, q in zip(result.rounds, ref.rounds):
            assert np.abs(r.image.astype(int) - q.image.astype(int)).max() <= 1
    # decode rows of several jobs shared forwards, and so did denoising steps
    assert max(rows for kind, rows in forwards if kind == "decode") >= 3
    lone_rows = {
        (64 // 8) * (48 // 8) + 2,
        2 * ((64 // 8) * (48 // 8) + 2),
        (80 // 8) * (32 // 8) + 2,
        2 * ((80 // 8) * (32 // 8) + 2),
        (32 // 8) ** 2 + 2,
        2 * ((32 // 8) ** 2 + 2),
    }
    assert any(rows not in lone_rows for kind, rows in forwards if kind == "denoise")
    # every page came back, the cancelled job's included (one page is the decode step's scratch)
    assert engine.pool.used_pages == 1 and s.reserved == 0


def test_admission_waits_for_room_and_serves_first_come_first(golden_dir: Path) -> None:
    small_pool = Engine(load_model(golden_dir / "model", device="cpu"), page_size=16, kv_cache_bytes=512 * 16 * 35)
    s = Scheduler(small_pool, max_active=4)
    p = params(mode="think", max_think_tokens=4, steps=3)
    program, pages = prepare(small_pool, p)
    assert pages <= s.capacity_pages < 2 * pages  # one at a time fits
    first = s.submit(program, pages)
    second = s.submit(*prepare(small_pool, p))
    s.step()
    assert first.status == "running" and second.status == "waiting"
    s.run([first, second])
    assert first.status == second.status == DONE and s.admission_waits > 0
    assert first.finished <= second.started
    with pytest.raises(ParamError, match="KV"):
        s.submit(*prepare(small_pool, params(rounds=3, max_think_tokens=64)))


def test_a_failing_job_fails_alone(engine: Engine) -> None:
    s = Scheduler(engine, max_active=2)

    def broken():
        yield from ()
        raise RuntimeError("boom")

    bad = s.submit(broken(), 1)
    good = s.submit(*prepare(engine, params(mode="direct", steps=3)))
    s.run([bad, good])
    assert bad.status == "failed" and "boom" in str(bad.error)
    assert good.status == DONE and engine.pool.used_pages == 1


def test_a_cancel_during_a_vae_decode_stops_between_two_of_its_stages(engine: Engine) -> None:
    stages = len(engine.vae.decoder.stages())
    seen: list[str] = []
    flag = {"stop": False, "ticks": 0}
    s = Scheduler(engine, max_active=1)
    job = s.submit(
        *prepare(engine, params(mode="direct", steps=3)),
        sink=lambda e: seen.append(e.type),
        should_cancel=lambda: flag["stop"],
    )
    while not job.over:
        s.step()
        if seen and seen[-1] == "image.progress" and seen.count("image.progress") == 2:
            flag["ticks"] += 1
            flag["stop"] = flag["ticks"] >= 3  # a few decoder stages in
    assert stages > 3 and job.status == CANCELLED
    assert "image.done" not in seen and engine.pool.used_pages == 1
