"""`irg weights verify` on the golden model directory and on damaged copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.weights import damage
from weights.verify import format_report, verify


def test_golden_is_clean(golden_model: Path) -> None:
    report = verify(golden_model)
    assert report.problems == [] and report.notes == []
    text = format_report(report)
    assert "ok: no problems found" in text
    assert "ema.safetensors: 111 tensors, 20.42 M parameters, BF16" in text
    assert "ae.safetensors: 176 tensors" in text
    assert "151644/151645/151652/151653" in text


def test_cli_golden_exit_0(golden_model: Path) -> None:
    r = damage.run_irg("weights", "verify", str(golden_model))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok: no problems found")
    assert r.stderr == ""


def test_ema_bf16_name_is_accepted(model_copy: Path) -> None:
    (model_copy / "ema.safetensors").rename(model_copy / "ema_bf16.safetensors")  # IRG's file name
    report = verify(model_copy)
    assert report.ok, report.problems
    assert [f.name for f in report.files] == ["ema_bf16.safetensors", "ae.safetensors"]


def test_both_ema_names_give_a_note(model_copy: Path) -> None:
    shutil.copyfile(model_copy / "ema.safetensors", model_copy / "ema_bf16.safetensors")
    report = verify(model_copy)
    assert report.ok
    assert report.notes == [
        "both ema.safetensors and ema_bf16.safetensors are present; the loader uses ema.safetensors"
    ]


def _problems(model: Path) -> list[str]:
    report = verify(model)
    assert not report.ok
    return report.problems


def test_renamed_tensor(model_copy: Path) -> None:
    damage.rename_tensor(model_copy)
    old, new = damage.RENAMED
    assert _problems(model_copy) == [
        f"ema.safetensors: missing tensor {old} (expected shape [64, 64])",
        f"ema.safetensors: unexpected tensor {new} (shape [64, 64])",
    ]


def test_wrong_shape(model_copy: Path) -> None:
    damage.reshape_tensor(model_copy)
    assert _problems(model_copy) == [
        f"ema.safetensors: tensor {damage.RESHAPED} has shape [1024, 64], expected [4096, 64]"
    ]


def test_float_tensor_of_another_dtype(model_copy: Path) -> None:
    damage.retype_tensor(model_copy, damage.AS_F32, torch.float32)
    assert _problems(model_copy) == [
        f"ema.safetensors: tensor {damage.AS_F32} is F32 while 110 other tensors of the file are BF16"
    ]


def test_integer_tensor(model_copy: Path) -> None:
    damage.retype_tensor(model_copy, damage.AS_I32, torch.int32)
    assert _problems(model_copy) == [
        f"ema.safetensors: tensor {damage.AS_I32} has dtype I32, expected a float type (BF16/F16/F32)"
    ]


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "vit_config.json").unlink()
    report = verify(model_copy)
    assert report.problems == [f"vit_config.json: missing from {model_copy}"]
    # without a config the tensor names cannot be checked; the headers still are (truncation, dtypes)
    assert report.notes == [
        "ema.safetensors: tensor names and shapes not checked (the configs have problems)",
        "ae.safetensors: tensor names and shapes not checked (the configs have problems)",
    ]


def test_truncated_file(model_copy: Path) -> None:
    size = (model_copy / "ema.safetensors").stat().st_size
    damage.truncate(model_copy / "ema.safetensors")
    [problem] = _problems(model_copy)
    assert problem.startswith(f"ema.safetensors: truncated ({size // 2} bytes on disk, the header describes ")


def test_truncated_inside_header(model_copy: Path) -> None:
    damage.truncate(model_copy / "ae.safetensors", keep=0.001)
    [problem] = _problems(model_copy)
    assert problem.startswith("ae.safetensors: truncated or not a safetensors file")


def test_missing_weight_files(model_copy: Path) -> None:
    (model_copy / "ema.safetensors").unlink()
    (model_copy / "ae.safetensors").unlink()
    assert _problems(model_copy) == [
        f"ema.safetensors or ema_bf16.safetensors: missing from {model_copy}",
        f"ae.safetensors: missing from {model_copy}",
    ]


def test_config_fields(model_copy: Path) -> None:
    def spoil(c: dict) -> None:
        c["hidden_size"] = "64"
        c["num_key_value_heads"] = 0
        del c["rope_theta"]

    damage.edit_json(model_copy / "llm_config.json", spoil)
    assert _problems(model_copy) == [
        "llm_config.json: rope_theta is missing",
        "llm_config.json: hidden_size must be an integer, got '64'",
        "llm_config.json: num_key_value_heads must be positive, got 0",
    ]


def test_unreadable_config(model_copy: Path) -> None:
    (model_copy / "llm_config.json").write_text("{not json", "utf-8")
    [problem] = _problems(model_copy)
    assert problem.startswith("llm_config.json: not readable JSON")


def test_vocab_smaller_than_tokenizer(model_copy: Path) -> None:
    damage.edit_json(model_copy / "llm_config.json", lambda c: c.__setitem__("vocab_size", 151000))
    problems = _problems(model_copy)
    assert problems[0] == (
        "tokenizer.json: 151665 tokens, but llm_config.json vocab_size is 151000 (every token needs an embedding row)"
    )
    # the embedding and lm_head rows follow vocab_size, so the weights no longer match either
    assert (
        "ema.safetensors: tensor language_model.model.embed_tokens.weight has shape [152064, 64], "
        "expected [151000, 64]" in problems
    )


def test_tokenizer_problems(model_copy: Path) -> None:
    damage.drop_special_token(model_copy, "<|vision_start|>")
    damage.drop_special_token(model_copy, "<|im_end|>")
    (model_copy / "merges.txt").unlink()
    assert _problems(model_copy) == [
        f"merges.txt: missing from {model_copy}",
        "tokenizer.json: special tokens <|im_end|> (eos), <|vision_start|> (start_of_image) are missing",
    ]


def test_every_problem_at_once(model_copy: Path) -> None:
    """The acceptance list in one directory: each damage is named, one line each, and the exit code is 1."""
    damage.rename_tensor(model_copy)
    damage.reshape_tensor(model_copy)
    damage.retype_tensor(model_copy, damage.AS_F32, torch.float32)
    damage.retype_tensor(model_copy, damage.AS_I32, torch.int32)
    damage.truncate(model_copy / "ae.safetensors")
    damage.edit_json(model_copy / "llm_config.json", lambda c: c.pop("rope_theta"))
    damage.drop_special_token(model_copy, "<|vision_end|>")
    r = damage.run_irg("weights", "verify", str(model_copy))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    problems = [line for line in r.stdout.splitlines() if line.startswith("  problem: ")]
    assert len(problems) == 8, r.stdout  # the rename is two: a missing and an unexpected tensor
    for needle in (
        "llm_config.json: rope_theta is missing",
        "<|vision_end|> (end_of_image) is missing",
        "ae.safetensors: truncated",
        f"{damage.AS_F32} is F32 while",
        f"{damage.AS_I32} has dtype I32",
        *damage.RENAMED,
        f"{damage.RESHAPED} has shape [1024, 64]",
    ):
        assert sum(needle in p for p in problems) == 1, (needle, r.stdout)
    assert r.stdout.rstrip().endswith("8 problems found")


def test_missing_config_in_cli(model_copy: Path) -> None:
    (model_copy / "vit_config.json").unlink()
    r = damage.run_irg("weights", "verify", str(model_copy))
    assert r.returncode == 1
    assert f"  problem: vit_config.json: missing from {model_copy}" in r.stdout.splitlines()
    assert r.stdout.rstrip().endswith("1 problem found")


def test_not_a_directory(tmp_path: Path) -> None:
    r = damage.run_irg("weights", "verify", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert f"problem: {tmp_path / 'nowhere'}: not a directory" in r.stdout


def test_headers_only(model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify never reads tensor data: a file whose data region is garbage still passes."""
    import safetensors
    import safetensors.torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("verify must not load tensors")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    path = model_copy / "ema.safetensors"
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with path.open("r+b") as f:
        f.seek(header_end)
        f.write(b"\xff" * (path.stat().st_size - header_end))
    assert verify(model_copy).ok


def test_long_lists_are_cut_per_file(model_copy: Path) -> None:
    """Configs that do not belong to the weights make every tensor wrong: 20 lines per file unless --all."""
    (model_copy / "ae_config.json").unlink()  # the FLUX sizes BAGEL hard-codes, not the golden's tiny VAE
    n = len(verify(model_copy).problems)
    assert n > 100
    r = damage.run_irg("weights", "verify", str(model_copy))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert sum(line.startswith("  problem: ae.safetensors: ") for line in lines) == 20
    assert f"  ... and {n - 20} more problems with ae.safetensors (--all lists them)" in lines
    assert lines[-1] == f"{n} problems found"
    r = damage.run_irg("weights", "verify", "--all", str(model_copy))
    assert sum(line.startswith("  problem: ") for line in r.stdout.splitlines()) == n
