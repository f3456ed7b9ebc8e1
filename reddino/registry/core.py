"""Register, promote, pull and list reddino models in MLflow."""

from __future__ import annotations

import contextlib
import json
import warnings
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient

from reddino.errors import PreflightError
from reddino.runtime import default_tracking_uri, mlflow_at

DEFAULT_NAME = "reddino-backbone"
BACKBONE_ARTIFACT = "backbone"
# reddino's own sklearn estimators (evaluate/classifiers.py), trusted by MLflow's skops loader for probes.
PROBE_TYPES = ["reddino.evaluate.classifiers.LinearProbe", "reddino.evaluate.classifiers.CosineKNN"]


_ANNOUNCED: set[str] = set()


def registry_uri() -> str:
    """The store every registry command reads: $MLFLOW_TRACKING_URI, else $REDDINO_HOME/mlflow.db."""
    return default_tracking_uri()


def _client(tracking_uri: str | None = None, announce: bool = True) -> MlflowClient:
    """A client of the registry store, said once on stderr (which store a command read is not obvious: the demo
    writes its own), after checking that a server answers within seconds (one error naming it otherwise)."""
    import sys

    from reddino.runtime import bound_mlflow_retries, check_tracking

    from reddino.runtime import verbose

    uri = tracking_uri or registry_uri()
    if not verbose():  # "Creating initial MLflow database tables...": not for our users
        import logging

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    bound_mlflow_retries()
    check_tracking(uri)
    if announce and uri not in _ANNOUNCED:
        _ANNOUNCED.add(uri)
        print(f"[reddino] model registry: {uri}", file=sys.stderr, flush=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(exc: BaseException) -> bool:
    """A registry answer saying 'no such model / version / alias' (any other error is reported as it is)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _missing(ref: str, exc: BaseException, client: MlflowClient) -> PreflightError:
    """One line for a model, version or alias the registry does not hold, with what it does hold."""
    body = _parse_ref(ref)[len("models:/"):]
    name = body.split("@")[0].split("/")[0]
    try:
        rm = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - the model itself is missing: list what is there
        try:
            names = sorted(m.name for m in client.search_registered_models())
        except Exception:  # noqa: BLE001
            names = []
        return PreflightError(f"{ref}: no registered model named {name!r} in {client.tracking_uri} (registered: "
                              f"{', '.join(names) or 'none'}; `reddino models list`)")
    aliases = ", ".join(f"@{a} (v{v})" for a, v in sorted((rm.aliases or {}).items())) or "no aliases"
    return PreflightError(f"{ref}: {exc.message if hasattr(exc, 'message') else exc} ({name} has {aliases}; "
                          "`reddino models list`)")


@contextlib.contextmanager
def _quiet_log_model():
    """MLflow's advisory output while logging a model (progress bars, the type-hint and cloudpickle notices,
    "Successfully registered model"): not for our users. Errors still raise; REDDINO_VERBOSE=1 shows it all."""
    from reddino.runtime import verbose

    if verbose():
        yield
        return
    import io
    import logging
    import os

    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.showwarning = lambda *args, **kwargs: None  # MLflow re-enables its notices per call
            yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


# MLflow suggests type hints on `predict` for input validation; the input is a DataFrame of encoded images
# (or a list of bytes), validated by decode_image, so the suggestion is not printed to every importer.
# (MLflow's own `simplefilter("once")` overrides any filter here, so the notice is muted at showwarning.)
with warnings.catch_warnings():
    warnings.showwarning = lambda *args, **kwargs: None

    class BackboneEmbedder(PythonModel):
        """pyfunc: a DataFrame with an `image` column of encoded PNG/JPEG bytes → CLS embeddings (n, D)."""

        def load_context(self, context) -> None:
            from reddino.features.models import load_backbone_file
            from reddino.model import model_img_size

            self.model = load_backbone_file(context.artifacts["backbone"])
            self.img_size = model_img_size(self.model)

        def predict(self, context, model_input, params=None):
            import torch

            from reddino.data import decode_image
            from reddino.features.extract import extract_features

            column = model_input["image"] if hasattr(model_input, "columns") else model_input
            images = [decode_image(bytes(b)) for b in list(column)]
            with torch.no_grad():
                feats = extract_features(self.model, images, img_size=self.img_size, batch_size=64, device="cpu")
            return np.asarray(feats, dtype=np.float32)


def _find_export(path: Path) -> Path:
    from reddino.features.models import find_backbone_file  # the one rule for which file is the backbone

    return find_backbone_file(path)


def _resolve_run(run: str, client: MlflowClient) -> tuple[Path, str | None]:
    """A backbone file, a run/checkpoint folder, or an MLflow run id → (export path, training run id)."""
    p = Path(run).expanduser()
    if p.exists():
        run_id = None
        for cand in (p / "mlflow_run_id", p.parent / "mlflow_run_id"):
            if cand.is_file():
                run_id = cand.read_text().strip()
        return _find_export(p), run_id
    try:
        client.get_run(run)
    except Exception as exc:
        if _not_found(exc):
            raise PreflightError(f"{run!r} is neither an existing path nor a run id in {client.tracking_uri}") from None
        raise
    with mlflow_at(client.tracking_uri):
        local = mlflow.artifacts.download_artifacts(run_id=run, artifact_path=BACKBONE_ARTIFACT,
                                                    dst_path=tempfile.mkdtemp(prefix="reddino-reg-"))
    return _find_export(Path(local)), run


def _example_images(img_size: int, n: int = 2) -> list[bytes]:
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = rng.integers(0, 255, (img_size, img_size, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".png", img)
        out.append(buf.tobytes())
    return out


def register_backbone(
    run: str,
    *,
    name: str = DEFAULT_NAME,
    metrics: dict[str, float] | None = None,
    alias: str = "candidate",
    description: str | None = None,
    baselines: dict[str, float] | None = None,
    tracking_uri: str | None = None,
):
    """Register the exported teacher backbone of `run` as a new version of `name` and alias it.

    `baselines` are the same metrics for a random-init model of the same architecture on the same evaluation;
    `promote` refuses a version that does not beat them.
    """
    import pandas as pd

    from reddino.model.backbone import read_export_meta

    client = _client(tracking_uri)
    export, train_run_id = _resolve_run(run, client)
    meta = read_export_meta(export)
    examples = pd.DataFrame({"image": _example_images(int(meta["img_size"]))})
    artifacts = {"backbone": str(export)}
    side = export.with_name(export.name + ".json")
    if side.exists():
        artifacts["backbone_meta"] = str(side)
    tags = {
        "reddino.kind": "backbone",
        "reddino.arch": str(meta.get("arch")),
        "reddino.img_size": str(meta.get("img_size")),
        "reddino.embed_dim": str(meta.get("embed_dim")),
        "reddino.config_hash": str(meta.get("config_hash", "")),
        "reddino.data_hash": str(meta.get("data_hash", "")),
        "reddino.training_run": str(train_run_id or meta.get("run_name", "")),
    }
    teacher = meta.get("teacher") if isinstance(meta.get("teacher"), dict) else None
    if teacher:  # a distilled student: its lineage (reddino.train.distill)
        tags["reddino.method"] = str(meta.get("method", "distill"))
        tags.update({f"reddino.teacher.{k}": str(v) for k, v in teacher.items()})
    for key, value in (metrics or {}).items():
        tags[f"metric.{key}"] = f"{float(value):.6f}"
    for key, value in (baselines or {}).items():
        tags[f"baseline.{key}"] = f"{float(value):.6f}"
    with mlflow_at(client.tracking_uri):  # start_run and log_model read MLflow's process-wide URIs
        mlflow.set_experiment("reddino-registry")
        with mlflow.start_run(run_name=f"register-{name}") as reg_run:
            mlflow.set_tags(tags)
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            with _quiet_log_model():
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=BackboneEmbedder(),
                    artifacts=artifacts,
                    input_example=examples,
                    pip_requirements=["reddino", "torch", "timm", "mlflow"],
                    registered_model_name=name,
                    metadata={"reddino": {k: v for k, v in meta.items() if isinstance(v, (str, int, float))}},
                )
    version = info.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_model_version_tag(name, str(version), "reddino.register_run", reg_run.info.run_id)
    if description:
        client.update_model_version(name, str(version), description=description)
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    return client.get_model_version(name, str(version))


def register_probe(probe, *, backbone: str, name: str | None = None, metrics: dict[str, float] | None = None,
                   classes: list[str] | None = None, class_ids: list[int] | None = None, alias: str = "candidate",
                   tags: dict[str, str] | None = None, artifacts: list[str | Path] = (),
                   tracking_uri: str | None = None):
    """Register a fitted sklearn probe, tagged with the backbone version (`name/version`) it needs.

    Served by MLflow, it maps embedding rows to class ids (`reddino.class_ids` / `reddino.classes` name them)."""
    import mlflow.sklearn

    client = _client(tracking_uri)
    bname, _, bversion = backbone.partition("/")
    name = name or f"{Path(bname).name}-probe"
    n_features = getattr(probe, "n_features_in_", None)
    example = np.zeros((1, int(n_features)), dtype=np.float32) if n_features else None
    with mlflow_at(client.tracking_uri):
        mlflow.set_experiment("reddino-registry")
        with mlflow.start_run(run_name=f"register-{name}"):
            if metrics:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            for path in artifacts:
                mlflow.log_artifact(str(path), artifact_path="probe")
            with _quiet_log_model():
                info = mlflow.sklearn.log_model(probe, name="model", registered_model_name=name, input_example=example,
                                                pip_requirements=["scikit-learn", "reddino"],
                                                skops_trusted_types=PROBE_TYPES)
    version = str(info.registered_model_version)
    all_tags = {"reddino.kind": "probe", "reddino.backbone": backbone, **(tags or {})}
    if classes:
        all_tags["reddino.classes"] = json.dumps(classes)
    if class_ids:
        all_tags["reddino.class_ids"] = json.dumps(class_ids)
    for key, value in (metrics or {}).items():
        all_tags[f"metric.{key}"] = f"{float(value):.6f}"
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def model_version(ref: str, tracking_uri: str | None = None):
    """The registry entry a `models:/`, `name@alias`, `name/version` or `name/latest` reference points at."""
    client = _client(tracking_uri)
    body = _parse_ref(ref)[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias.split("/")[0])
        name, _, version = body.partition("/")
        version = version.split("/")[0]
        if version.isdigit():
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        if _not_found(exc):
            raise _missing(ref, exc, client) from None
        raise
    if not versions:
        raise _missing(ref, ValueError(f"no registered model named {name!r}"), client)
    return max(versions, key=lambda mv: int(mv.version))


def load_probe_version(ref: str, tracking_uri: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(sklearn estimator, probe.json metadata) of a registered probe."""
    import mlflow.sklearn

    mv = model_version(ref, tracking_uri)
    if (mv.tags or {}).get("reddino.kind") != "probe":
        raise ValueError(f"{ref} (v{mv.version}) is not a reddino probe "
                         f"(tag reddino.kind={mv.tags.get('reddino.kind')!r})")
    with mlflow_at(tracking_uri or registry_uri()), _no_download_bars():  # models:/ resolves through the globals
        estimator = mlflow.sklearn.load_model(f"models:/{mv.name}/{mv.version}")
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="probe/probe.json",
                                                        dst_path=tmp)
            meta = json.loads(Path(local).read_text())
    meta["registered"] = {"name": mv.name, "version": str(mv.version)}
    return estimator, meta


def _metric(version, metric: str, kind: str = "metric") -> float | None:
    value = (version.tags or {}).get(f"{kind}.{metric}")
    return float(value) if value not in (None, "") else None


def promote(name: str, *, alias: str = "champion", metric: str = "knn20_balanced_accuracy",
            candidate_alias: str = "candidate", force: bool = False,
            tracking_uri: str | None = None) -> tuple[bool, str]:
    """Move `alias` to the candidate if it beats the current holder on `metric` (or with force)."""
    client = _client(tracking_uri)
    try:
        cand = client.get_model_version_by_alias(name, candidate_alias)
    except Exception as exc:
        if _not_found(exc):
            raise _missing(f"{name}@{candidate_alias}", exc, client) from None
        raise  # a connection or server error stays what it is
    try:
        champ = client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        if not _not_found(exc):  # unknown whether a champion exists: never crown the candidate by accident
            raise
        champ = None
    c_score = _metric(cand, metric)
    if champ is not None and champ.version == cand.version:
        return False, f"v{cand.version} already holds @{alias}"
    if force:
        client.set_registered_model_alias(name, alias, cand.version)
        return True, f"@{alias} → v{cand.version} (forced)"
    if c_score is None:
        return False, f"candidate v{cand.version} has no '{metric}' evaluation; evaluate it first or use --force"
    # A pretrained model has to earn its place against its own architecture with random weights.
    base = _metric(cand, metric, kind="baseline")
    arch = (cand.tags or {}).get("reddino.arch", "?")
    if base is None:
        return False, (f"candidate v{cand.version} has no random-init baseline for '{metric}'; evaluate it beside "
                       f"random:{arch} and register with that evaluation (or use --force); stays @{candidate_alias}")
    if c_score <= base:
        return False, (f"candidate v{cand.version} ({metric} {c_score:.4f}) does not beat its random-init "
                       f"{arch} baseline ({base:.4f}); stays @{candidate_alias}")
    margin = f"random init {base:.4f}"
    if champ is None:
        client.set_registered_model_alias(name, alias, cand.version)
        return True, f"@{alias} → v{cand.version}: first {alias} ({metric} {c_score:.4f}; {margin})"
    h_score = _metric(champ, metric)
    if h_score is not None and c_score <= h_score:
        return False, (f"candidate v{cand.version} ({metric} {c_score:.4f}) does not beat @{alias} "
                       f"v{champ.version} ({h_score:.4f}); stays @{candidate_alias}")
    client.set_registered_model_alias(name, alias, cand.version)
    was = "n/a" if h_score is None else f"{h_score:.4f}"
    return True, f"@{alias} → v{cand.version}: {metric} {c_score:.4f} beats v{champ.version} ({was}; {margin})"


def _parse_ref(ref: str) -> str:
    if ref.startswith("models:/"):
        return ref
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    return f"models:/{ref}@champion"


def pull(ref: str, out: str | Path, tracking_uri: str | None = None) -> Path:
    """Download a registered backbone (`name@alias`, `name/version` or a models:/ URI) into `out`."""
    mv = model_version(ref, tracking_uri)  # a missing model or alias: one line, before any folder exists
    if (mv.tags or {}).get("reddino.kind") == "probe":
        raise PreflightError(f"{ref} (v{mv.version}) is a probe, not a backbone: `reddino classify --probe {ref}` "
                             "uses it")
    out = Path(out).expanduser()
    with tempfile.TemporaryDirectory() as tmp, _no_download_bars(), mlflow_at(tracking_uri or registry_uri()):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp))
        export = _find_export(local)
        out.mkdir(parents=True, exist_ok=True)
        target = out / export.name
        for src, dst in [(export, target), (export.with_name(export.name + ".json"), out / (export.name + ".json"))]:
            if src.exists():
                shutil.copy2(src, dst.with_name(dst.name + ".tmp"))
                dst.with_name(dst.name + ".tmp").replace(dst)
    return target


@contextlib.contextmanager
def _no_download_bars():
    """MLflow's "Downloading artifacts" bars stay off the console (REDDINO_VERBOSE=1 keeps them)."""
    import os

    from reddino.runtime import verbose

    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    if not verbose():
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def load_backbone(ref: str, device: str = "cpu", tracking_uri: str | None = None):
    """A ready timm model from `models:/name@alias` (or a local export path)."""
    from reddino.features.models import load_backbone_file as load_export

    if Path(ref).expanduser().exists():
        return load_export(_find_export(Path(ref).expanduser()), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        return load_export(pull(ref, tmp, tracking_uri), device=device)


def _teacher_label(tags: dict[str, str]) -> str:
    """``name vN (weights <hash12>)`` of a distilled model's teacher; '' for anything else."""
    if not tags.get("reddino.teacher.hash"):
        return ""
    version = tags.get("reddino.teacher.version")
    return (tags.get("reddino.teacher.name", "?") + (f" v{version}" if version else "")
            + f" (weights {tags['reddino.teacher.hash'][:12]})")


def list_models(announce: bool = True, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model version with its aliases and metric tags (``announce``: say the store on stderr)."""
    client = _client(tracking_uri, announce=announce)
    rows = []
    for rm in client.search_registered_models():
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            tags = mv.tags or {}
            rows.append({
                "name": rm.name, "version": int(mv.version),
                "aliases": sorted(aliases_by_version.get(str(mv.version), [])),
                "kind": tags.get("reddino.kind", ""), "arch": tags.get("reddino.arch", ""),
                "backbone": tags.get("reddino.backbone", ""),
                "teacher": _teacher_label(tags),
                "metrics": {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")},
            })
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


def baseline_metrics(eval_json: str | Path) -> dict[str, float]:
    """The headline of the random-init model of the first model's architecture in the same `reddino evaluate`
    output (`results.json` beside `metrics.json`); {} when the evaluation had none."""
    path = Path(eval_json)
    results = path if path.name == "results.json" else path.with_name("results.json")
    if not results.is_file():
        return {}
    models = json.loads(results.read_text()).get("models", [])
    if not models:
        return {}
    arch = (models[0].get("info") or {}).get("arch")
    for entry in models[1:]:
        info = entry.get("info") or {}
        if info.get("kind") == "random" and info.get("arch") == arch:
            return {k: float(v) for k, v in (entry.get("headline") or {}).items() if isinstance(v, (int, float))}
    return {}


def headline_metrics(eval_json: str | Path) -> dict[str, float]:
    """Flatten the headline numbers of a `reddino evaluate` metrics JSON: every numeric leaf whose
    key path ends in a metric name, joined with '_' (e.g. knn20_balanced_accuracy)."""
    data = json.loads(Path(eval_json).read_text())
    out: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}_{k}" if prefix else str(k))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix] = float(node)

    walk(data.get("headline", data), "")
    return out
