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


def _user_errors_as_one_line(callback):
    """A command whose :class:`reddino.errors.UserError` prints as ``error: <message>`` on stderr and exits with
    the error's code; ``--verbose`` also prints the traceback."""
    import functools

    @functools.wraps(callback)  # typer reads the signature through __wrapped__
    def run(*args, **kwargs):
        from reddino.errors import UserError
        from reddino.runtime import verbose

        try:
            return callback(*args, **kwargs)
        except UserError as exc:
            if verbose():
                import traceback

                traceback.print_exc()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=exc.exit_code) from None

    return run


def _wrap_commands(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.callback is not None and not hasattr(command.callback, "__wrapped__"):
            command.callback = _user_errors_as_one_line(command.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _wrap_commands(group.typer_instance)


def _register_all() -> None:
    # Every sibling module exposes `register(app)`; import order does not matter.
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()
_wrap_commands(app)

__all__ = ["app"]
