"""Errors irg_core raises on purpose; each message names the file, tensor or field at fault."""


class ModelError(Exception):
    """A model directory cannot be used: a config, tokenizer or weight file is missing or wrong."""


class ConfigError(ModelError):
    """A configuration file is missing, unreadable or inconsistent."""


class CheckpointError(ModelError):
    """A safetensors file is missing, truncated, or does not hold the tensors the architecture needs."""


class TokenizerError(ModelError):
    """The tokenizer files are missing or do not hold BAGEL's special tokens."""


class Cancelled(Exception):
    """The caller asked a running trajectory to stop; raised at the next step boundary."""
