"""CLI options derived from a typed config: one option per field, its help and default from the field.

Every derived option defaults to None ("not given"), so a value from ``--config FILE`` is overridden only by an
option the user typed; the config's own default is shown in the help.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from typing import Any, Callable, List, Literal, Optional

import typer
from pydantic import BaseModel


def _base(annotation: Any) -> Any:
    """``T`` of ``T | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _option(name: str, field: Any, decls: tuple[str, ...]) -> inspect.Parameter:
    ann = _base(field.annotation)
    kind, extra = ann, {}
    if typing.get_origin(ann) is Literal:  # typer takes choices as an Enum
        values = [str(a) for a in typing.get_args(ann)]
        kind = enum.Enum(f"{name}_choices", {v.replace("-", "_").replace("+", "_"): v for v in values}, type=str)
    elif typing.get_origin(ann) is list:
        kind = List[typing.get_args(ann)[0]]
    flag = "--" + name.replace("_", "-")
    if not decls:
        decls = (f"{flag}/--no-{flag[2:]}",) if ann is bool else (flag,)
    default = field.get_default(call_default_factory=True)
    help_text = (field.description or "").rstrip(".") + "." + (f" Default: {default}." if default is not None else "")
    opt = typer.Option(None, *decls, help=help_text, show_default=False, **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=Optional[kind])


def config_command(
    cls: type[BaseModel],
    run: Callable[..., None],
    *,
    params: list[inspect.Parameter],
    skip: tuple[str, ...] = (),
    decls: dict[str, tuple[str, ...]] | None = None,
    doc: str | None = None,
) -> Callable[..., None]:
    """A typer command: ``params`` (the command's own options/arguments) + one option per field of ``cls``.

    ``run(updates, **own)`` gets the fields the user set (``{field: value}``) and the command's own parameters.
    """
    decls = decls or {}
    own = [p.name for p in params]
    fields = [n for n in cls.model_fields if n not in skip]
    derived = [_option(n, cls.model_fields[n], decls.get(n, ())) for n in fields]

    def command(**kwargs: Any) -> None:
        updates = {n: kwargs[n] for n in fields if kwargs.get(n) is not None}
        updates = {n: list(v) if isinstance(v, (list, tuple)) else v.value if isinstance(v, enum.Enum) else v
                   for n, v in updates.items()}
        run(updates, **{n: kwargs[n] for n in own})

    sig = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params] + derived
    command.__signature__ = inspect.Signature(sig)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in sig}
    command.__doc__ = doc or run.__doc__
    command.__name__ = getattr(run, "__name__", "command")
    return command


def param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A command's own parameter (``default`` is a ``typer.Option`` / ``typer.Argument``)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
