"""The Qwen2 byte-level BPE tokenizer of a model directory, with BAGEL's framing of text segments.

BAGEL frames every text segment as `[<|im_start|>] + encode(text) + [<|im_end|>]`, with no chat template,
and decodes generated ids with special tokens kept, taking the text between the leading `<|im_start|>` and
the first `<|im_end|>` or second `<|im_start|>` (BAGEL_SPEC §2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from irg_core.errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    bos: int
    eos: int
    start_of_image: int
    end_of_image: int
    bos_text: str
    eos_text: str


def _special_tokens() -> dict[str, dict]:
    data = json.loads(resources.files("irg_core.data").joinpath("special_tokens.json").read_text("utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def special_token_names() -> dict[str, str]:
    return {k: v["token"] for k, v in _special_tokens().items()}


def expected_special_ids() -> dict[str, int]:
    """The ids BAGEL's checkpoints were trained with (the Qwen2.5 tokenizer's), by role."""
    return {k: v["id"] for k, v in _special_tokens().items()}


class Tokenizer:
    def __init__(self, tok: _HFTokenizer):
        self._tok = tok
        names = special_token_names()
        ids = {role: tok.token_to_id(text) for role, text in names.items()}
        missing = [f"{names[role]} ({role})" for role, token_id in ids.items() if token_id is None]
        if missing:
            what = "special tokens {} are" if len(missing) > 1 else "special token {} is"
            raise TokenizerError(f"{TOKENIZER_FILE}: {what.format(', '.join(missing))} missing")
        self.special = SpecialTokens(
            ids["bos"], ids["eos"], ids["start_of_image"], ids["end_of_image"], names["bos"], names["eos"]
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{TOKENIZER_FILE}: missing from {path.parent}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exceptions on malformed files
            raise TokenizerError(f"{TOKENIZER_FILE}: not a valid tokenizer file ({e})") from e
        return cls(tok)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def frame(self, text: str) -> list[int]:
        """A text segment as BAGEL prefills it."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def thought(self, generated: list[int]) -> str:
        """The text of generated ids (without the start token), cut as the official recipe cuts it."""
        text = self.decode(generated)
        return text.split(self.special.eos_text)[0].split(self.special.bos_text)[0]


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.thought(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""  # wait for the rest of a multi-byte character
        piece, self._emitted = text[len(self._emitted) :], text
        return piece

    def flush(self) -> str:
        text = self._tok.thought(self._ids)
        piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece
