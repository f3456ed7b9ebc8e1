"""Sweep-space files: which config keys a study varies, and how (Optuna distributions)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from reddino.config import CONFIG_DIR, ConfigError, RunConfig, load_config

_KINDS = ("choice", "uniform", "loguniform", "int")


@dataclass
class SweepSpace:
    base: str
    metric: str
    mode: str
    space: dict[str, dict[str, Any]]
    overrides: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    # ablation only: per axis, a published finding to check ({claim: text, better: the value it found better})
    claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    # values that travel with an axis value: {axis: {value: {config key: value}}}, e.g. a backbone family's
    # weights file, crop sizes and iBOT switch with its `model.arch` (ablation mode only)
    tied: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    path: str = ""
    metric_named: bool = False  # the space file names its metric (else: the in-training kNN at eval.k)

    @property
    def k(self) -> int | None:
        """The kNN ``k`` of the metric when it is an in-training kNN score (``eval_knn<k>_...``)."""
        m = re.fullmatch(r"eval_knn(\d+)_\w+", self.metric)
        return int(m.group(1)) if m else None

    def for_config(self, cfg: RunConfig) -> "SweepSpace":
        """The space's metric for the trials' config: the kNN at their ``eval.k`` unless the file names another
        score; a file naming a kNN score at another k than ``eval.k`` is refused (no trial would report it)."""
        if not self.metric_named:
            return replace(self, metric=cfg.eval.metric)
        if self.k is not None and self.k != cfg.eval.k:
            raise ConfigError(f"{self.path}: metric {self.metric} but the trials run eval.k={cfg.eval.k} (they report "
                              f"{cfg.eval.metric}); drop the metric line to follow eval.k, or set eval.k={self.k}")
        return self

    def optuna_space(self) -> dict[str, Any]:
        import optuna.distributions as od

        if self.tied:
            raise ConfigError(f"{self.path}: `tied` values (axes {', '.join(self.tied)}) need --mode ablation")
        out: dict[str, Any] = {}
        for key, spec in self.space.items():
            kind, arg = next(iter(spec.items()))
            if kind == "choice":
                out[key] = od.CategoricalDistribution(arg)
            elif kind == "uniform":
                out[key] = od.FloatDistribution(float(arg[0]), float(arg[1]))
            elif kind == "loguniform":
                out[key] = od.FloatDistribution(float(arg[0]), float(arg[1]), log=True)
            elif kind == "int":
                out[key] = od.IntDistribution(int(arg[0]), int(arg[1]))
        return out

    def base_config(self, extra: list[str] | None = None) -> RunConfig:
        return load_config(self.base, list(self.overrides) + list(extra or []))

    def units(self, base: RunConfig) -> list[str | None]:
        """Every data.unit a trial may train on: the recipe's, and each value of a data.unit axis."""
        spec = self.space.get("data.unit") or {}
        return list(dict.fromkeys([self.recipe.get("data.unit", base.data.unit), *spec.get("choice", [])]))

    def ablation_variants(self) -> list[dict[str, Any]]:
        """The recipe, then every categorical axis flipped to each of its other values."""
        recipe = {k: v for k, v in self.recipe.items()}
        for key, spec in self.space.items():
            kind, arg = next(iter(spec.items()))
            if kind != "choice":
                raise ConfigError(f"{self.path}: ablation mode needs categorical axes; {key} is {kind}")
            recipe.setdefault(key, arg[0])
        variants = [{"name": "recipe", "axis": "-", "value": "-", "params": self._with_tied(recipe)}]
        for key, spec in self.space.items():
            for value in spec["choice"]:
                if value == recipe[key]:
                    continue
                params = dict(recipe)
                params[key] = value
                variants.append({"name": f"{key}={value}", "axis": key, "value": value,
                                 "params": self._with_tied(params)})
        return variants

    def _with_tied(self, params: dict[str, Any]) -> dict[str, Any]:
        out = dict(params)
        for axis, table in self.tied.items():
            out.update(table.get(params.get(axis), {}))
        return out


def seeded_arms(variants: list[dict[str, Any]], seed: int, seeds: int) -> list[dict[str, Any]]:
    """Every ablation arm once per seed ``seed, seed+1, ...`` (its ``train.seed`` param; the rest of the budget
    is the same), seed-major: all arms of the first seed run before any second seed, so an interrupted study
    already has a whole table."""
    return [{**v, "seed": s, "params": {**v["params"], "train.seed": s}}
            for s in range(seed, seed + seeds) for v in variants]


def resolve_space_path(name: str | Path) -> Path:
    p = Path(name).expanduser()
    if p.exists():
        return p
    for candidate in (CONFIG_DIR / "sweeps" / p, CONFIG_DIR / "sweeps" / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(x.stem for x in (CONFIG_DIR / "sweeps").glob("*.yaml"))
    raise ConfigError(f"sweep space not found: {name} (shipped: {', '.join(shipped)})")


def load_space(name: str | Path) -> SweepSpace:
    path = resolve_space_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for required in ("base", "space"):
        if required not in raw:
            raise ConfigError(f"{path}: missing field '{required}'")
    space = raw["space"]
    base_cfg = load_config(raw["base"], list(raw.get("overrides") or []))
    flat = base_cfg.flat()
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _KINDS:
            raise ConfigError(f"{path}: space.{key} must be one of {{{', '.join(k + ': ...' for k in _KINDS)}}}")
        if key not in flat:
            raise ConfigError(f"{path}: space.{key} is not a config key")
        # Validate every categorical value once (with what is tied to it), so a typo fails before any trial starts.
        kind, arg = next(iter(spec.items()))
        for value in arg if kind == "choice" else arg[:1]:
            tied_to = ((raw.get("tied") or {}).get(key) or {}).get(value) or {}
            pairs = [(key, value), *tied_to.items()] if isinstance(tied_to, dict) else [(key, value)]
            load_config(raw["base"], list(raw.get("overrides") or [])
                        + [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                           for k, v in pairs])
    claims = dict(raw.get("claims") or {})
    for key, spec in claims.items():
        if key not in space:
            raise ConfigError(f"{path}: claims.{key} is not an axis of the space")
        if not isinstance(spec, dict) or not isinstance(spec.get("claim"), str) or set(spec) - {"claim", "better"}:
            raise ConfigError(f"{path}: claims.{key} must be {{claim: <text>, better: <one of its values>}}")
        choices = next(iter(space[key].values()))
        if "better" in spec and spec["better"] not in choices:
            raise ConfigError(f"{path}: claims.{key}.better={spec['better']!r} is not one of {choices}")
    tied = dict(raw.get("tied") or {})
    for axis, table in tied.items():
        if axis not in space or "choice" not in space[axis]:
            raise ConfigError(f"{path}: tied.{axis} is not a categorical axis of the space")
        for value, values in (table or {}).items():
            if value not in space[axis]["choice"]:
                raise ConfigError(f"{path}: tied.{axis}.{value} is not one of {space[axis]['choice']}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: tied.{axis}.{value} must map config keys to values")
            unknown = sorted(set(values) - set(flat))
            if unknown:
                raise ConfigError(f"{path}: tied.{axis}.{value}: {', '.join(unknown)} not config keys")
            load_config(raw["base"], list(raw.get("overrides") or []) + params_to_overrides({axis: value, **values}))
    return SweepSpace(
        base=raw["base"],
        metric=raw.get("metric") or base_cfg.eval.metric,
        metric_named=bool(raw.get("metric")),
        mode=raw.get("mode", "max"),
        space=space,
        overrides=list(raw.get("overrides") or []),
        recipe=dict(raw.get("recipe") or {}),
        scheduler=dict(raw.get("scheduler") or {}),
        claims=claims,
        tied=tied,
        path=str(path),
    )


def params_to_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in params.items()]
