"""The loop's periodic hooks, each small and on its own: training-health monitors + the collapse guard, and the
in-training kNN evaluation. The loop calls them every ``train.monitor_every`` / ``eval.every`` steps."""

from __future__ import annotations

from typing import Any, Callable

from reddino.config import RunConfig


class HealthMonitor:
    """Rank 0: teacher entropy and RankMe of the last step, and the collapse guard on them.

    After the lr warm-up, a sign seen at two monitor steps in a row is a collapse: it warns once (console and
    the MLflow tag ``reddino.collapse_warning``), or, with ``train.collapse_stop``, gives the stop reason."""

    def __init__(self, cfg: RunConfig, guard_from: int, tag: Callable[[str, str], None] | None = None) -> None:
        self.cfg, self.guard_from, self.tag = cfg, guard_from, tag
        self._before = False
        self._warned = False
        self.stop_reason: str | None = None

    def due(self, step: int, is_last: bool) -> bool:
        every = self.cfg.train.monitor_every
        return bool(every) and (step % every == 0 or is_last)

    def __call__(self, model, step: int) -> dict[str, float]:
        from reddino.model import rankme, teacher_entropy
        from reddino.model.monitors import collapse_signs

        metrics: dict[str, float] = {}
        cls = getattr(model, "last_teacher_cls", None)
        probs = getattr(model, "last_teacher_probs", None)
        if cls is not None:
            metrics["rankme"] = rankme(cls.float())
        if probs is not None:
            metrics["teacher_entropy"], metrics["teacher_mean_entropy"] = teacher_entropy(probs.float())
        if "rankme" not in metrics or step < self.guard_from:
            return metrics
        t = self.cfg.train
        signs = collapse_signs(
            rankme_value=metrics["rankme"], n_rows=int(cls.shape[0]), dim=int(cls.shape[-1]),
            mean_entropy=metrics.get("teacher_entropy"), marginal=metrics.get("teacher_mean_entropy"),
            prototypes=self.cfg.model.head_prototypes, rankme_frac=t.collapse_rankme_frac,
            uniform_frac=t.collapse_uniform_frac, marginal_frac=t.collapse_marginal_frac)
        confirmed = bool(signs) and self._before  # two monitor steps in a row
        self._before = bool(signs)
        if confirmed:
            metrics["collapse"] = 1.0
            text = f"step {step}: " + "; ".join(signs)
            if t.collapse_stop:
                self.stop_reason = f"representation collapse at {text}; run stopped, last good checkpoint kept"
            elif not self._warned:
                self._warned = True
                print(f"[reddino] WARNING collapse: {text}. The features are not learning; see "
                      "README 'Training health' (train.collapse_stop=true stops such runs).", flush=True)
                if self.tag is not None:
                    self.tag("reddino.collapse_warning", text)
        return metrics


class KnnEval:
    """Rank 0: kNN (and, on the last step, the linear probe) of the teacher's frozen CLS on ``eval.data``."""

    def __init__(self, cfg: RunConfig, device) -> None:
        from reddino.data import load_table

        self.cfg, self.device = cfg, device
        self.table = load_table([cfg.eval.data], exclude_labels=cfg.eval.exclude_labels)

    @staticmethod
    def due(cfg: RunConfig, step: int, is_last: bool) -> bool:
        return bool(cfg.eval.data) and ((bool(cfg.eval.every) and step % cfg.eval.every == 0) or is_last)

    def __call__(self, model, step: int, is_last: bool) -> dict[str, Any]:
        from reddino.evaluate import knn_score

        model.eval()
        try:
            scores = knn_score(model.teacher["backbone"], self.table, img_size=self.cfg.model.img_size,
                               k=self.cfg.eval.k, max_images=self.cfg.eval.max_images, seed=self.cfg.train.seed,
                               device=self.device, probe=is_last,  # the probe too, once, on the final teacher
                               precision=self.cfg.eval.precision)
        finally:
            model.train()
        k = self.cfg.eval.k
        shown = [(label, key) for label, key in ((f"kNN-{k}", f"knn{k}"), ("kNN-1", "knn1"), ("probe", "probe"))
                 if f"{key}_balanced_accuracy" in scores]
        shown = list(dict.fromkeys(shown))  # k = 1: one kNN-1
        print(f"[reddino] step {step} balanced accuracy on {int(scores.get('n_images', 0))} eval images: " + ", ".join(
            f"{label} {scores[f'{key}_balanced_accuracy']:.3f} ± {scores.get(f'{key}_balanced_accuracy_std', 0):.3f}"
            for label, key in shown), flush=True)
        # eval_step: which evaluation the carried-forward eval_* values come from (every later report repeats them)
        return {"eval_step": step, **{f"eval_{k}": v for k, v in scores.items() if isinstance(v, (int, float))}}
