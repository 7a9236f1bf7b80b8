"""The click groups behind ``deco``: verbs imported on first use, plugin verbs from entry points,
and the one place where a user's error becomes a one-line message and a non-zero exit."""

from __future__ import annotations

import os
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import click

from runtimes.errors import DecoError
from runtimes.interrupts import interrupts_raise, raise_if_interrupted

from ..messages import one_line

# Ctrl-C: one line and the shell's exit status for SIGINT. Every writer stages and renames
# (atomic files, `BundleTransaction`), so an interrupted run leaves finished files only.
INTERRUPTED = "interrupted (Ctrl-C); nothing was left half-written"
INTERRUPTED_STATUS = 130


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause and fix: shown as one line, never as a traceback. Every error
    of the package derives from `runtimes.errors.DecoError`; OSErrors (read-only, busy,
    permission) are shown with their path and a fix."""
    return (DecoError, ValueError, OSError, KeyError)


class LazyGroup(click.Group):
    """Subcommands imported on first use, so that `deco --help` stays fast and a verb's
    dependencies load only when it runs."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(import_module(module), attr), name)
        return super().get_command(ctx, name)


class DecoGroup(LazyGroup):
    """The top-level group: turns user errors into one-line messages and mounts plugin verbs
    (the ``deco.commands`` entry-point group, e.g. training's ``train`` and ``eval``)."""

    def invoke(self, ctx: click.Context) -> Any:
        with interrupts_raise():
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            raise_if_interrupted()  # an interrupt whose KeyboardInterrupt a finalizer swallowed
            return result
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if os.environ.get("DECO_DEBUG"):
                raise
            click.echo(f"Error: {INTERRUPTED}", err=True)
            raise click.exceptions.Exit(INTERRUPTED_STATUS) from None
        except ModuleNotFoundError as err:
            if os.environ.get("DECO_DEBUG"):
                raise
            raise click.ClickException(
                f"{err.name} is not installed; install the matching extra, e.g. "
                f"pip install 'deco-export[{extra_for(err.name)}]'"
            ) from None
        except Exception as err:
            if os.environ.get("DECO_DEBUG") or not isinstance(err, user_errors()):
                raise
            raise click.ClickException(one_line(err)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *plugin_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)  # built-in and lazy verbs
        if command is not None:
            return command
        entry = plugin_commands().get(name)
        return entry.load() if entry is not None else None
def plugin_commands() -> dict[str, Any]:
    return {e.name: e for e in entry_points(group="deco.commands")}


def extra_for(module: str | None) -> str:
    """The pip extra that installs ``module``: a backend's runtime library by its catalogue
    entry, else the exporters' and verbs' own libraries."""
    from runtimes.catalogue import extra_for as backend_extra

    top = (module or "").split(".")[0]
    return backend_extra(top) or {
        "onnx": "onnx", "onnxscript": "onnx", "matplotlib": "train", "scipy": "eval",
        "tqdm": "torch",
    }.get(top, "dev")
