"""Checks run before anything starts (Ray, MLflow runs, output folders): each bad input is one clear error.

The drivers call these with one line each: ``check_run(cfg)`` before `pretrain` starts Ray,
``check_sweep(base_cfg, units)`` before a sweep does, ``check_tracking(uri)`` before the first MLflow call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from reddino.errors import PreflightError
from reddino.runtime import bound_mlflow_retries, check_tracking  # noqa: F401 - the drivers' one import

if TYPE_CHECKING:
    from reddino.config import RunConfig

def _remote(path: str) -> bool:
    return "://" in str(path)


def _manifest(path: str, role: str):
    from reddino.data.shards import ManifestError, read_manifest

    try:
        return read_manifest(Path(path).expanduser())
    except ManifestError as exc:
        raise PreflightError(f"{role}: {exc}") from None


def check_training_data(paths: Iterable[str], unit: str | None, min_rows: int = 1, role: str = "data.paths") -> None:
    """Every local dataset exists and together they hold at least ``min_rows`` rows of ``unit`` (one global
    batch: a pass over fewer rows yields no batch). Remote URIs are read by the workers and not checked here."""
    paths = [str(p) for p in paths]
    if not paths:
        raise PreflightError(f"{role}: no training data given (--data DIR or data.paths=[...])")
    local = [p for p in paths if not _remote(p)]
    found: dict[str, int] = {}
    for p in local:
        for name, count in (_manifest(p, role).get("units") or {}).items():
            found[name] = found.get(name, 0) + int(count)
    if len(local) < len(paths):
        return
    rows = sum(found.values()) if unit is None else found.get(unit, 0)
    what = "rows" if unit is None else f"{unit} rows"
    if rows == 0:
        held = ", ".join(f"{n} {c}" for n, c in sorted(found.items())) or "nothing"
        other = sorted(set(found) - {unit})
        hint = (f"; ingest {_plural(unit)} (`reddino ingest ... --unit {unit}`)"
                + (f" or train on {_plural(other[0])} (data.unit={other[0]})" if other else "")) if unit else ""
        raise PreflightError(f"{role}: {', '.join(paths)} hold no {what} (the recipe trains on data.unit={unit}; "
                             f"they hold {held}){hint}")
    if rows < min_rows:
        raise PreflightError(f"{role}: {', '.join(paths)} hold {rows} {what}, fewer than one global batch "
                             f"({min_rows} = train.batch_size_per_worker x train.num_workers): no step could run")


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def check_eval_data(path: str | None, role: str = "eval.data", exclude: Iterable[int] | None = None) -> None:
    """The labelled set the in-training kNN scores on exists and holds labelled rows (beyond the excluded ones)."""
    if not path or _remote(path):
        return
    labels = _manifest(path, role).get("labels") or {}
    skip = {str(x) for x in (exclude or [])}
    labelled = sum(int(v.get("count", 0)) if isinstance(v, dict) else int(v) for k, v in labels.items() if k not in skip)
    if labelled == 0:
        raise PreflightError(f"{role}: {path} holds no labelled rows{' outside the excluded labels' if skip else ''} "
                             "(the kNN score needs labelled cells, e.g. `reddino ingest chula ... --unit cell`)")


def check_file(path: str | None, role: str) -> None:
    if path and not _remote(path) and not Path(path).expanduser().exists():
        raise PreflightError(f"{role}: {path} does not exist")


def check_run(cfg: "RunConfig", tracking_uri: str | None = None, units: Iterable[str | None] | None = None) -> None:
    """Everything `pretrain` (or each arm of a sweep, ``units``) will read, before Ray starts."""
    for unit in (units if units is not None else [cfg.data.unit]):
        check_training_data(cfg.data.paths, unit, cfg.train.batch_size_per_worker * cfg.train.num_workers)
    check_eval_data(cfg.eval.data, exclude=cfg.eval.exclude_labels)
    check_file(cfg.model.pretrained, "model.pretrained")
    if cfg.mlflow.enabled:
        from reddino.runtime import default_tracking_uri

        check_tracking(tracking_uri or cfg.mlflow.tracking_uri or default_tracking_uri())


_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")


def check_model_ref(ref) -> None:
    """A `reddino evaluate` / `embed` model reference names something that exists: a file or dir, a registered
    model version (server reachable), a timm arch; each miss is one line saying which."""
    if not isinstance(ref, (str, Path)):  # an nn.Module
        return
    text = str(ref)
    if text == "handcrafted" or text.startswith(("runs:/", "mlflow-artifacts:", "dbfs:/")):
        return
    if text.startswith("models:/"):
        from reddino.registry.core import model_version

        model_version(text)  # reachable server, existing model / version / alias, or one line
        return
    path = Path(text).expanduser()
    if path.exists():
        return
    if "/" in text or text.startswith((".", "~")) or text.endswith(_FILE_SUFFIXES):
        raise PreflightError(f"--model {text}: no such file or directory")
    import timm

    import reddino.model  # noqa: F401 - registers reddino's own archs (vit_mini_patch8_reddino, ...) with timm

    arch = text.split(":", 1)[1] if text.startswith("random:") else text
    if not timm.is_model(arch):
        raise PreflightError(f"--model {text}: not a file, a models:/ or runs:/ URI, 'handcrafted' or a timm "
                             f"architecture (random:<arch>)")


def check_labelled_data(paths: Iterable[str], role: str = "--data") -> None:
    """Every dataset an evaluation reads exists and holds labelled rows."""
    for p in paths:
        check_eval_data(str(p), role=role)


def check_eval_inputs(models: Iterable, data: Iterable[str]) -> None:
    """Everything `reddino evaluate` reads, before its output folder exists."""
    for ref in models:
        check_model_ref(ref)
    check_labelled_data(data)
