"""Which exceptions the command line reports as one readable line instead of a traceback."""

from __future__ import annotations

import sys

from irg_core.errors import Cancelled, ModelError
from irg_core.params import ParamError


class CommandError(Exception):
    """A command cannot run as asked (bad option combination, unreadable file, no network...)."""


def expected_error(e: BaseException) -> str | None:
    if isinstance(e, (ModelError, ParamError, CommandError)):
        return str(e)
    # server.settings (pydantic) is imported only by the commands that read settings; a SettingsError can only
    # come from one of them, and `irg generate` / `bench` / `understand` run where pydantic is not installed
    settings = sys.modules.get("server.settings")
    if settings is not None and isinstance(e, settings.SettingsError):
        return str(e)
    if isinstance(e, Cancelled):
        return "cancelled"
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)
    return None
