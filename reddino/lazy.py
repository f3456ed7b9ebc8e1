"""Lazy public names of a package: ``import reddino.evaluate`` stays cheap, ``reddino.evaluate.evaluate`` imports
its module (torch, sklearn, ...) on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``name`` from ``where[name]`` (``.runner`` relative to ``package``, or an
    absolute module) and caching it on the package."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
