"""The root of every error a user can cause and fix.

Each layer raises its own subclass (a damaged bundle, a missing runtime, a bad checkpoint, a
failed parity gate, ...); the CLI catches `DecoError` once and prints its message, one line that
names the problem and the fix. Subclasses keep a second, built-in base (``ValueError``,
``RuntimeError``, ``FileNotFoundError``) where callers already catch that.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DecoError", "DecoWarning"]


class DecoError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(DecoError, ValueError):
    """A model or sampler configuration is incomplete, mistyped or out of range."""


class DecoWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one
    line."""
