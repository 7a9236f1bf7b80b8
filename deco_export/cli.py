"""The ``deco`` entry point (``deco = deco_export.cli:main``); the commands live in
``deco_export.commands``."""

from __future__ import annotations

import sys

from .commands import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
