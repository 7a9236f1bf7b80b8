"""The ``deco`` entry point (``deco = deco_export.cli:run``); the commands live in
``deco_export.commands`` (``main``, the click group, is what tests and plugins invoke)."""

from __future__ import annotations

import os
import sys

from .commands import main
from .commands.group import INTERRUPTED_STATUS

__all__ = ["main", "run"]


def run() -> None:
    """Run ``deco`` and exit with its status. An interrupted verb (Ctrl-C, SIGTERM) has already
    cleaned up and printed its one line when it gets here; it leaves with status 130 through
    ``os._exit``, because CPython can mark an interrupt that reached Python code run from a
    C extension as unhandled even after it was caught, and would then end the process by
    SIGINT instead of with the status the shell expects."""
    try:
        main()
    except SystemExit as done:
        if done.code == INTERRUPTED_STATUS:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED_STATUS)
        raise


if __name__ == "__main__":  # pragma: no cover
    run()
