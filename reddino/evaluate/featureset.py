"""Features with their rows' metadata (:class:`FeatureSet`) and the deterministic choice of rows to embed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa


@dataclass
class FeatureSet:
    """Features with the labels, groups, sources and ids of the same rows."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None
    sources: np.ndarray
    label_names: np.ndarray
    image_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # further per-row columns (e.g. a split)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask_or_idx) -> "FeatureSet":
        idx = np.asarray(mask_or_idx)
        return FeatureSet(
            features=self.features[idx],
            labels=self.labels[idx],
            groups=None if self.groups is None else self.groups[idx],
            sources=self.sources[idx],
            label_names=self.label_names[idx],
            image_ids=self.image_ids[idx],
            meta=dict(self.meta),
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    def exclude(self, labels: Iterable[int] | None) -> "FeatureSet":
        labels = list(labels or [])
        if not labels:
            return self
        return self.subset(~np.isin(self.labels, labels))

    @property
    def class_names(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for lab, name in zip(self.labels.tolist(), self.label_names.tolist()):
            out.setdefault(int(lab), str(name) if name not in (None, "") else str(lab))
        return dict(sorted(out.items()))

    @staticmethod
    def concat(sets: Sequence["FeatureSet"]) -> "FeatureSet":
        if len(sets) == 1:
            return sets[0]
        groups = None
        if all(s.groups is not None for s in sets):
            groups = np.concatenate([s.groups for s in sets])
        return FeatureSet(
            features=np.concatenate([s.features for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            groups=groups,
            sources=np.concatenate([s.sources for s in sets]),
            label_names=np.concatenate([s.label_names for s in sets]),
            image_ids=np.concatenate([s.image_ids for s in sets]),
            meta={"parts": [s.meta for s in sets]},
            extras={
                k: np.concatenate([s.extras[k] for s in sets])
                for k in sets[0].extras
                if all(k in s.extras for s in sets)
            },
        )


def _str_array(values) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def select_rows(
    meta: pa.Table,
    *,
    exclude_labels: Iterable[int] | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the labelled, non-excluded rows; at most ``max_images`` of them.

    The subset is deterministic and independent of row order: rows are ranked by a hash of
    (seed, sha256, image_id) and the first ``max_images`` kept (then returned in table order).
    """
    labels = meta.column("label").to_pylist()
    excl = set(int(x) for x in (exclude_labels or []))
    idx = np.array([i for i, lab in enumerate(labels) if lab is not None and int(lab) not in excl], dtype=np.int64)
    if max_images is not None and max_images > 0 and len(idx) > max_images:
        shas = meta.column("sha256").to_pylist() if "sha256" in meta.column_names else [""] * meta.num_rows
        ids = meta.column("image_id").to_pylist() if "image_id" in meta.column_names else [""] * meta.num_rows
        ranks = [hashlib.sha256(f"{seed}:{shas[i]}:{ids[i]}:{i if not ids[i] else ''}".encode()).digest() for i in idx]
        order = sorted(range(len(idx)), key=lambda j: ranks[j])[:max_images]
        idx = np.sort(idx[order])
    return idx


def row_keys(meta: pa.Table, idx: np.ndarray) -> list[str]:
    """``image_id|sha256`` of each selected row (its index when the table lacks either column)."""
    ids = meta.column("image_id").to_pylist() if "image_id" in meta.column_names else None
    shas = meta.column("sha256").to_pylist() if "sha256" in meta.column_names else None
    if ids is None or shas is None:
        return [str(i) for i in idx]
    return [f"{ids[i]}|{shas[i]}" for i in idx]


def feature_set_from(
    meta: pa.Table, idx: np.ndarray, feats: np.ndarray, extra: dict[str, Any], extra_columns: Sequence[str] = ()
) -> FeatureSet:
    """The :class:`FeatureSet` of rows ``idx`` of ``meta`` whose features are ``feats``."""
    sub = meta.take(pa.array(idx)) if len(idx) != meta.num_rows else meta
    names = sub.column_names
    n = sub.num_rows
    groups = _str_array(sub.column("group").to_pylist()) if "group" in names else None
    return FeatureSet(
        features=feats,
        labels=np.array(sub.column("label").to_pylist(), dtype=np.int64),
        groups=groups,
        sources=_str_array(sub.column("source").to_pylist()) if "source" in names else np.array([""] * n),
        label_names=_str_array(sub.column("label_name").to_pylist()) if "label_name" in names else np.array([""] * n),
        image_ids=_str_array(sub.column("image_id").to_pylist()) if "image_id" in names else _str_array(idx),
        meta=extra,
        extras={c: _str_array(sub.column(c).to_pylist()) for c in extra_columns if c in names},
    )
