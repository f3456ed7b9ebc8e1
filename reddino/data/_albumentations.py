"""albumentations without two import-time side effects: an HTTPS request to PyPI in every process that imports it
(its update check: a network call at run time, up to 2 s where PyPI is out of reach) and ``import torch`` (its
``albumentations.pytorch`` re-export, ~2 s in each Ray Data worker, which never touches a tensor)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if "albumentations" not in sys.modules and "torch" not in sys.modules:
    # albumentations wraps `from .pytorch import *` in suppress(ImportError): a None entry makes it skip that
    sys.modules["albumentations.pytorch"] = None  # type: ignore[assignment]
    try:
        import albumentations  # noqa: F401
    finally:
        del sys.modules["albumentations.pytorch"]  # an explicit `import albumentations.pytorch` later works as usual

import albumentations as A  # noqa: E402

__all__ = ["A"]
