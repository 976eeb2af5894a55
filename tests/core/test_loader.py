"""Strict loading: the official layout loads unchanged; every damaged directory gets one clear error."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from irg_core.checkpoint import expected_bagel
from irg_core.config import BagelConfig
from irg_core.errors import CheckpointError, ConfigError, ModelError, TokenizerError
from irg_core.loader import build_dummy, load_model
from tests.conftest import REPO

FULL = Path(__file__).resolve().parents[2] / "irg_core" / "data" / "bagel_7b_mot.json"


@pytest.fixture()
def model_copy(golden_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(golden_dir / "model", dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


def test_golden_layout_loads_strictly(golden_dir: Path) -> None:
    m = load_model(golden_dir / "model", device="cpu")
    state = load_file(str(golden_dir / "model" / "ema.safetensors"))
    for name, tensor in m.model.state_dict().items():
        assert torch.equal(tensor, state[name].float()), name  # bf16 file -> float32, bit-exact
    assert m.dtype == torch.float32 and len(m.tokenizer) == 151665
    assert m.tokenizer.special.bos == 151644 and m.tokenizer.special.end_of_image == 151653


def _rewrite(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "damage, error, words",
    [
        ("shape", CheckpointError, ["vae2llm.weight", "shape"]),
        ("missing", CheckpointError, ["missing tensor", "llm2vae.bias"]),
        ("renamed", CheckpointError, ["unexpected tensor", "time_embedder.mlp.0.weight"]),
        ("truncated", CheckpointError, ["ema.safetensors", "truncated"]),
        ("no_config", ConfigError, ["vit_config.json", "missing"]),
        ("bad_config", ConfigError, ["llm_config.json", "hidden_size"]),
        ("no_tokenizer", TokenizerError, ["tokenizer.json", "missing"]),
        ("no_ae", CheckpointError, ["ae.safetensors", "missing"]),
        ("integer_tensor", CheckpointError, ["connector.fc1.bias", "dtype"]),
    ],
)
def test_damaged_directories_give_one_clear_error(model_copy: Path, damage: str, error: type, words: list[str]) -> None:
    ema = model_copy / "ema.safetensors"
    if damage == "shape":
        _rewrite(ema, lambda t: t.__setitem__("vae2llm.weight", torch.zeros(64, 32, dtype=torch.bfloat16)))
    elif damage == "missing":
        _rewrite(ema, lambda t: t.pop("llm2vae.bias"))
    elif damage == "renamed":
        _rewrite(ema, lambda t: t.__setitem__("time_embedder.mlp.0.weights", t.pop("time_embedder.mlp.0.weight")))
    elif damage == "truncated":
        data = ema.read_bytes()
        ema.write_bytes(data[: len(data) // 2])
    elif damage == "no_config":
        (model_copy / "vit_config.json").unlink()
    elif damage == "bad_config":
        cfg = json.loads((model_copy / "llm_config.json").read_text())
        (model_copy / "llm_config.json").write_text(json.dumps(dict(cfg, hidden_size="big")))
    elif damage == "no_tokenizer":
        (model_copy / "tokenizer.json").unlink()
    elif damage == "no_ae":
        (model_copy / "ae.safetensors").unlink()
    elif damage == "integer_tensor":
        _rewrite(ema, lambda t: t.__setitem__("connector.fc1.bias", torch.zeros(64, dtype=torch.int32)))
    with pytest.raises(error) as info:
        load_model(model_copy, device="cpu")
    assert isinstance(info.value, ModelError)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_full_size_architecture_matches_the_spec() -> None:
    cfg = BagelConfig.from_dict(json.loads(FULL.read_text()))
    shapes = expected_bagel(cfg)
    assert len(shapes) == 1223  # BAGEL_SPEC 9.4
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(total / 1e9 - 14.61) < 0.01
    assert shapes["latent_pos_embed.pos_embed"] == (4096, 3584)
    assert shapes["vit_model.vision_model.embeddings.patch_embedding.weight"] == (1152, 588)
    assert "vit_model.vision_model.encoder.layers.25.mlp.fc2.bias" in shapes
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc2.bias" not in shapes  # 27 on disk, 26 built
    assert shapes["language_model.model.layers.27.self_attn.k_proj_moe_gen.weight"] == (512, 3584)


def test_dummy_weights_are_built_where_they_live() -> None:
    """Dummy weights are allocated on the target device directly (meta here: no memory at all)."""
    cfg = BagelConfig.from_dict(json.loads(FULL.read_text()))
    m = build_dummy(cfg, device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in m.model.parameters())


def test_dummy_weights_have_the_official_tables(golden_dir: Path) -> None:
    cfg = BagelConfig.from_model_dir(golden_dir / "model")
    m = build_dummy(cfg, device="cpu", dtype=torch.float32, seed=1)
    official = load_file(str(golden_dir / "model" / "ema.safetensors"))
    for name in ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"):
        torch.testing.assert_close(getattr(m.model, name.split(".")[0]).pos_embed.bfloat16(), official[name])


def test_position_grids_follow_the_checkpoint(model_copy: Path) -> None:
    """A checkpoint built with max_latent_size 32 (not the scripts' 64) loads with a 32-wide latent grid;
    a cut-down 64-wide table of the same size is a wrong shape."""
    from irg_core.model.embed import sincos_table

    ema = model_copy / "ema.safetensors"
    _rewrite(ema, lambda t: t.__setitem__("latent_pos_embed.pos_embed", sincos_table(64, 32).bfloat16()))
    m = load_model(model_copy, device="cpu")
    assert m.cfg.max_latent_size == 32 and m.cfg.max_image_side == 512
    _rewrite(ema, lambda t: t.__setitem__("latent_pos_embed.pos_embed", sincos_table(64, 64)[:1024].bfloat16()))
    with pytest.raises(CheckpointError, match=r"latent_pos_embed.pos_embed has shape \[1024, 64\]"):
        load_model(model_copy, device="cpu")


def test_building_and_loading_does_not_import_dynamo(golden_dir: Path) -> None:
    """Module init on the meta device must not reach PyTorch's Python decompositions, which import
    `torch._dynamo` (about a second of every `irg` command's start-up); checked in a fresh interpreter."""
    code = (
        "import sys\n"
        "from irg_core.checkpoint import expected_bagel\n"
        "from irg_core.config import BagelConfig\n"
        "from irg_core.loader import load_model\n"
        f"load_model({str(golden_dir / 'model')!r}, device='cpu')\n"
        "import json, pathlib\n"
        f"expected_bagel(BagelConfig.from_dict(json.loads(pathlib.Path({str(FULL)!r}).read_text())))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
