"""Which exceptions the command line reports as one readable line instead of a traceback."""

from __future__ import annotations

from irg_core.errors import Cancelled, ModelError
from irg_core.params import ParamError
from server.settings import SettingsError


class CommandError(Exception):
    """A command cannot run as asked (bad option combination, unreadable file, no network...)."""


def expected_error(e: BaseException) -> str | None:
    if isinstance(e, (ModelError, ParamError, CommandError, SettingsError)):
        return str(e)
    if isinstance(e, Cancelled):
        return "cancelled"
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)
    return None
