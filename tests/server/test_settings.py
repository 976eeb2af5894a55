"""One settings class, read from IRG_ variables."""

from __future__ import annotations

import pytest

from server.settings import Settings


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRG_REDIS_URL", "redis://example:6379/2")
    monkeypatch.setenv("IRG_QUEUE_MAX", "7")
    monkeypatch.setenv("IRG_API_KEYS", "k" * 16 + ",  " + "j" * 16 + ",")
    monkeypatch.setenv("IRG_MODEL_DIR", "/models/bagel")
    s = Settings()
    assert (s.redis_url, s.queue_max, s.api_keys) == ("redis://example:6379/2", 7, ["k" * 16, "j" * 16])
    assert str(s.model_dir) == "/models/bagel" and s.worker_ttl_s == 3 * s.heartbeat_s


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IRG_QUEUE_MAX", "0"),
        ("IRG_MAX_SIDE", "1000"),
        ("IRG_MAX_SIDE", "2048"),
        ("IRG_API_KEYS", "short"),
        ("IRG_REDIS_PREFIX", "bad prefix"),
    ],
)
def test_bad_values_fail_at_startup(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        Settings()
