"""Small helpers the command-line scripts share: logging that actually prints, messages in flag terms."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Logs ``openpi.*`` records at `level` and every other library's warnings to stderr.

    absl (imported by orbax, hence by `openpi.models`) installs its own handler on the root logger when it is
    imported, so a script's later ``logging.basicConfig`` did nothing and openpi's INFO lines (per-episode results,
    resume notes) never printed. This replaces the root handlers (``force=True``) whatever was imported before, and
    keeps other libraries at WARNING (orbax and jax are chatty at INFO).
    """
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, force=True)
    logging.getLogger("openpi").setLevel(level)


def cli_message(message: str, flags: Mapping[str, str]) -> str:
    """`message` as a command-line user needs it.

    A library error tells a Python caller the fix as ``name=...`` or ``name=True`` (e.g. ``asset_id=...``); for each
    ``name`` in `flags` that becomes the flag the user types (``flags["asset_id"] == "--asset-id"``).
    """
    for name, flag in flags.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}=(?:\.\.\.|True)", flag, message)
    return message
