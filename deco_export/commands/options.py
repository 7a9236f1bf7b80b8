"""Option types and parsers shared by several verbs: sizes, integer lists, solver names, the
backend option, and the flags every exporter shares (`export_flags`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from runtimes.sampler import SOLVER_ALIASES, SOLVERS

# The one reader of a size the user typed; the verbs import it from here.
from runtimes.sizes import parse_size as parse_size
from runtimes.solver_tables import TUNED


class SolverChoice(click.Choice):
    """The sampler's solvers by their real names, and "tuned" (a bundle's tuned solver table
    for the steps asked for); the older spellings (``adams2``, ``heun_cheap``, ...) are still
    accepted but not listed."""

    def __init__(self) -> None:
        super().__init__([*SOLVERS, TUNED])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in SOLVER_ALIASES:
            return value  # SamplerConfig resolves it
        return super().convert(value, param, ctx)


class CatalogueHelp(click.Option):
    """An option whose help names the backends of the catalogue when the help is shown (a
    backend registered after the verb was imported is listed too): ``help`` is a template
    with ``{bundle}`` (the backends that run a bundle), ``{default}`` (the default one) and
    ``{checkpoint}`` (the one that runs a checkpoint)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from ..sampling import CHECKPOINT_BACKEND, bundle_backends

        template = getattr(self, "_template", None) or self.help or ""
        self._template = template
        bundle = bundle_backends()
        self.help = template.format(bundle=", ".join(bundle), default=bundle[0],
                                    checkpoint=CHECKPOINT_BACKEND)
        return super().get_help_record(ctx)


Command = TypeVar("Command", bound=Callable[..., Any])

# One meaning of --force in every verb that writes: replace what is there instead of refusing
# or keeping it, and only once what replaces it is complete.
FORCE_HELP = ("replace what the output already holds where it would be refused or kept (a "
              "directory that is not a bundle of this checkpoint; up-to-date TensorRT engines), "
              "only once the new files have passed their gates")


def export_flags(command: Command) -> Command:
    """The flags every ``deco export`` verb shares, declared once: ``--parity-steps`` and
    ``--force`` (the fields of `deco_export.export.options.ExportOptions` a user sets)."""
    command = click.option("--force", is_flag=True, help=FORCE_HELP)(command)
    return click.option("--parity-steps", type=int, default=10, show_default=True,
                        help="sampler steps of the end-to-end parity gate (TensorRT: 0 skips "
                             "it; Core ML: on macOS)")(command)


def echo_step(message: str) -> None:
    """An exporter's progress line, indented on stderr."""
    click.echo(f"  {message}", err=True)


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,2, 4' -> [1, 2, 4]; an empty string is an empty list."""
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(
            f"cannot read {what} {text!r}; write integers separated by commas"
        ) from None


def parse_csv(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None stays None (the option was not given)."""
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """A non-empty comma list of integers, or None when the option was not given."""
    if text is None:
        return None
    try:
        values = tuple(int(p) for p in parse_csv(text) or [])
    except ValueError:
        raise ValueError(f"cannot read {what} {text!r}; write integers separated by commas, "
                         "e.g. 1,4") from None
    if not values:
        raise ValueError(f"{what} is empty; write integers separated by commas, e.g. 1,4")
    return values


def model_text_encoder(config: Any, text_encoder: str | None, source: str,
                       say: Any = None) -> Any:
    """The text encoder an export of ``source`` uses: ``--text-encoder`` when given, else the
    one the checkpoint's metadata names (``say`` reports that choice); None when there is
    neither or ``source`` is a bundle without one. A class-conditional model refuses it."""
    if not config.is_text_to_image:
        if text_encoder is not None:
            raise click.UsageError("--text-encoder is for text-to-image models")
        return None
    from ..sources import is_bundle, model_path
    from ..text_encoders import load_text_encoder, recorded_text_encoder

    if text_encoder is None and not is_bundle(source):
        text_encoder = recorded_text_encoder(model_path(source))
        if text_encoder is not None and say is not None:
            say(f"text encoder: {text_encoder} (named by {source})")
    if text_encoder is None:
        return None
    return load_text_encoder(text_encoder, config.text_len, config.text_dim)


def single_value(values: tuple[str, ...], flag: str) -> str | None:
    """The one value of an option given at most once (declared ``multiple=True`` so that a
    repeat is refused instead of silently dropping the earlier values)."""
    if len(values) > 1:
        raise click.UsageError(f"{flag} was given {len(values)} times; give it once")
    return values[0] if values else None
