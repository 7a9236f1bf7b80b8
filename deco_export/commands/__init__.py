"""The ``deco`` command line: the group and its verbs, one module per verb.

Verbs mirror the Python API and are imported on first use (`deco --help` stays fast, and a
verb's dependencies load only when it runs). Each fails with a one-line reason and a non-zero
exit; set DECO_DEBUG=1 for the traceback. A new verb is a module here plus one line in the
table below. Library modules never import click, and nothing here is imported by them.

Training verbs (``train``, ``eval``) live in the ``training`` package and are mounted through
the ``deco.commands`` entry-point group, so this package never imports ``training``.
"""

from __future__ import annotations

import os
import warnings

# On shared or busy machines OpenMP threads that spin while waiting slow every torch call
# several-fold; waiting passively costs nothing measurable when the machine is idle. This must
# be set before torch is imported, which is why the package imports torch lazily.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from runtimes.errors import DecoWarning

from .group import DecoGroup

__all__ = ["main"]

VERBS = {
    "convert": "deco_export.commands.convert:convert",
    "export": "deco_export.commands.export:export",
    "validate": "deco_export.commands.validate:validate",
    "sample": "deco_export.commands.sample:sample",
    "calibrate": "deco_export.commands.calibrate:calibrate_command",
    "bench": "deco_export.commands.bench:bench_command",
    "serve": "deco_export.commands.serve:serve",
}


@click.group(cls=DecoGroup, context_settings={"help_option_names": ["-h", "--help"]},
             lazy=VERBS)
@click.version_option(package_name="deco-export")
def main() -> None:
    """DeCo: faithful model, split-graph export and fast sampling on every runtime."""
    warnings.formatwarning = one_line_warning


_python_format = warnings.formatwarning


def one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                     lineno: int, line: str | None = None) -> str:
    """The package's own warnings as one line on the terminal ("warning: ..."); others as
    Python writes them."""
    if issubclass(category, DecoWarning):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)
