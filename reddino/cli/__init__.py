"""The `reddino` command line: a thin shell over the package.

Each workflow registers its commands from its own module (``reddino/cli/<area>.py``) so the
shell stays small and every command's logic lives in the package proper.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="reddino",
    help="Self-supervised DINOv2 pretraining and evaluation for red-blood-cell microscopy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    # Every sibling module exposes `register(app)`; import order does not matter.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()

__all__ = ["app"]
