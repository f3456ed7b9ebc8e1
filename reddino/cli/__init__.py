"""The `reddino` command line: a thin shell over the package.

Each workflow registers its commands from its own module (``reddino/cli/<area>.py``) so the
shell stays small and every command's logic lives in the package proper.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import typer

app = typer.Typer(
    name="reddino",
    help="Self-supervised DINOv2 pretraining and evaluation for red-blood-cell microscopy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v",
        help="Show Ray's and MLflow's own output on the console (same as REDDINO_VERBOSE=1).",
    ),
) -> None:
    if verbose:  # an env var, so Ray's worker processes (started later) inherit it
        os.environ["REDDINO_VERBOSE"] = "1"


def _register_all() -> None:
    # Every sibling module exposes `register(app)`; import order does not matter.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()

__all__ = ["app"]
