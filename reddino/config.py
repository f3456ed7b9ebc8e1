"""Typed configuration: every knob of a reddino run in one place.

A run is described by one YAML file (see ``reddino/configs/``) plus ``key.sub=value`` overrides.
Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from reddino.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"


def _check_custom_resources(field: str, resources: dict[str, float] | None) -> None:
    """CPU/GPU have knobs of their own (cpus_per_*, use_gpu); an amount must be positive."""
    for name, amount in (resources or {}).items():
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(f"{field}: {name!r} has its own knob; list only custom resources here")
        if not amount > 0:
            raise ValueError(f"{field}: {name} must be > 0, got {amount}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """What images feed pretraining and how Ray Data moves them."""

    paths: list[str] = Field(default_factory=list, description="Parquet dataset dirs (each with _manifest.json).")
    sources: list[str] | None = None
    unit: Literal["patch", "cell"] | None = "patch"
    source_weights: dict[str, float] | None = None
    resize: int | None = Field(224, ge=1)  # every image is resized to this square before cropping (RedDino)
    shuffle_buffer: int = Field(256, ge=0)  # rows; per-worker local shuffle in the loader (0 = off)
    read_parallelism: int | None = None
    map_batch_size: int = Field(32, ge=1)  # rows per Ray Data augmentation task
    map_concurrency: int = Field(1, ge=1)  # concurrent CPU augmentation tasks (per trainer, all workers)
    cpus_per_map_task: float = Field(1.0, gt=0)
    # Custom Ray resources each augmentation task asks for besides its CPUs, e.g. {data: 0.01}: the tasks then run
    # only on nodes started with `--resources '{"data": N}'` (CPU-only data nodes beside the GPU nodes).
    map_resources: dict[str, float] | None = None
    prefetch_batches: int = Field(2, ge=0)
    # Start each data pass while the previous one is still training (two Ray Data executions take turns), so
    # no step waits for a pass to start up (reads, shuffle-buffer fill); exact resume is unchanged.
    overlap_passes: bool = True

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        _check_custom_resources("data.map_resources", self.map_resources)
        return self


#: The version of each augmentation policy (reddino.data.augment): bump it whenever a policy's output changes for a
#: seed. Each run records it (MLflow tag reddino.crops_policy, e.g. "rbc v2"); a resume across a bump warns. Here,
#: not beside the policies, so the driver reads it without importing albumentations and cv2.
POLICY_VERSIONS = {"dinov2": 2, "rbc": 2, "cell": 1, "none": 2}  # dinov2/none 2: fastaug (torchvision's draws)
# rbc 2: rbcfast.ISONoise, equal in distribution to albumentations' (same draws) but not the same pixels for a seed


class CropConfig(_Section):
    """DINOv2 multi-crop and pixel augmentation."""

    global_crops_number: int = Field(2, ge=1)
    global_crops_size: int = Field(224, ge=1)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = Field(1, ge=0)  # 0 = no local crops
    local_crops_size: int = Field(98, ge=1)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    policy: Literal["dinov2", "rbc", "cell", "none"] = "rbc"
    rbc_pick: int = Field(4, ge=0)  # RedDino: pick k of the n pixel transforms ...
    rbc_p: float = Field(0.85, ge=0, le=1)  # ... each applied with probability p
    flip_rotate_p: float = Field(0.85, ge=0, le=1)
    # `cell` policy's colour: mild (small hue/saturation shifts) or strong (DINO's ColorJitter + 20 % grayscale, so
    # a stain's colour cannot identify a cell's other views; pallor is luminance and survives both)
    cell_colour: Literal["mild", "strong"] = "mild"
    # Crops made on the training device, a batch at a time (dinov2 / none policies): the data workers only decode
    # and draw each crop's parameters (benchmarks/augment_cost.py: CPU per image, worker side)
    on_device: bool = False

    @model_validator(mode="after")
    def _check(self) -> "CropConfig":
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise FieldError(f"crops.{name}", f"must be [min, max] with 0 < min <= max <= 1, got {[lo, hi]}")
        if self.on_device and self.policy not in ("dinov2", "none"):
            raise FieldError("crops.on_device", f"supports the dinov2 and none policies, not {self.policy!r} "
                             "(an albumentations pipeline, CPU only)", related=("crops.policy",))
        return self


class MaskConfig(_Section):
    """iBOT block masking of the global crops."""

    sample_probability: float = Field(0.5, ge=0, le=1)
    ratio_min: float = Field(0.1, ge=0, le=1)
    ratio_max: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "MaskConfig":
        if self.ratio_min > self.ratio_max:
            raise FieldError("mask.ratio_min", f"must be <= mask.ratio_max ({self.ratio_max}), got {self.ratio_min}")
        return self


class ModelConfig(_Section):
    arch: str = "vit_small_patch14_dinov2"
    img_size: int = Field(224, ge=1)
    patch_size: int | None = Field(None, ge=1)  # None: the architecture's own
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    # extra timm constructor kwargs of the backbone (e.g. {depth: 2}, ConvNeXt {dims: [...], ls_init_value: 0.1}),
    # recorded by the export so load_backbone builds the same module
    timm_kwargs: dict[str, Any] | None = None
    pretrained: str | None = None  # local file: timm or original DINOv2 state dict, or a reddino export
    head_prototypes: int = Field(131072, ge=1)
    head_hidden_dim: int = Field(2048, ge=1)
    head_bottleneck_dim: int = Field(256, ge=1)
    head_nlayers: int = Field(3, ge=1)
    # BatchNorm in the DINO head's hidden layers (DINO's use_bn_in_head), teacher on batch statistics too. It
    # removes the component every image shares, so a from-scratch model gets image-specific teacher targets
    # (a separate iBOT head never gets BN: a batch may mask 0 or 1 patch tokens).
    head_use_bn: bool = False
    ibot_separate_head: bool = False
    ibot_head_prototypes: int | None = Field(None, ge=1)  # only with a separate head; None = head_prototypes


class GramWeightSchedule(_Section):
    """DINOv3's Gram ``loss_weight_schedule``, as a factor on ``loss.gram_weight`` (the official values with
    gram_weight 1): ``start → peak`` linearly over ``warmup_epochs``, then a half cosine ``peak → end`` over
    ``cosine_epochs`` (None: the rest of the run), then ``end`` (epochs of ``iters_per_epoch``)."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 1.0
    warmup_epochs: float = 0.0
    cosine_epochs: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "GramWeightSchedule":
        if min(self.start, self.peak, self.end) < 0:
            raise ValueError("loss.gram_weight_schedule: start, peak and end must be >= 0")
        if self.warmup_epochs < 0 or (self.cosine_epochs is not None and self.cosine_epochs < 0):
            raise ValueError("loss.gram_weight_schedule: warmup_epochs and cosine_epochs must be >= 0")
        return self


class LossConfig(_Section):
    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    ibot_average_over: Literal["all", "masked"] = "all"  # DINOv2: divide by all global crops
    koleo_weight: float = Field(0.0, ge=0)
    centering: Literal["ema", "sinkhorn_knopp"] = "sinkhorn_knopp"
    sinkhorn_iterations: int = Field(3, ge=1)
    center_momentum: float = Field(0.9, ge=0, le=1)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    # May exceed the run (RedDino: 30 epochs of warm-up, 10 trained): the run then ends inside the warm-up.
    warmup_teacher_temp_epochs: float = Field(30, ge=0)
    # Gram anchoring (DINOv3; reddino.model.gram): on when gram_weight > 0.
    gram_weight: float = 0.0  # weight of the Gram term (DINOv3 gram.loss_weight); 0 = off
    gram_weight_schedule: GramWeightSchedule | None = None  # per-step factor on gram_weight; None: constant
    # frozen: a separate backbone, the model at step 0 (or gram_teacher_path), refreshed from the EMA teacher on
    # the schedule below; ema: the EMA teacher itself on the same crops (DINOv3 gram.ema_teacher)
    gram_teacher: Literal["frozen", "ema"] = "frozen"
    gram_teacher_path: str | None = None  # frozen teacher's starting weights: a backbone file (as model.pretrained)
    gram_first_refresh: int | None = None  # step at which the frozen teacher first becomes the EMA teacher; None: never
    gram_refresh_every: int = 10000  # steps between refreshes (DINOv3 update_frequency)
    gram_max_refreshes: int | None = None  # DINOv3 max_updates; None: no limit
    # Gram teacher's crops: the global crops' geometry at this size, geometric augmentation only; its token grid
    # is resized to the student's. None: the student's global crops (DINOv3 crops.gram_teacher_crops_size)
    gram_teacher_crops_size: int | None = None
    gram_normalized: bool = True  # L2-normalise the features first (DINOv3 gram.normalized)
    gram_img_level: bool = True  # one Gram matrix per image (DINOv3's Gram recipes); False: over the local batch
    gram_remove_neg: bool = False  # clip negative entries of both Gram matrices to 0
    gram_remove_only_teacher_neg: bool = False  # clip the teacher's only (excludes gram_remove_neg)
    gram_tokens_used: Literal["all", "masked", "unmasked"] = "all"  # masked/unmasked need gram_img_level false
    gram_resize_method: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    gram_resize_antialias: bool = False

    @property
    def gram_enabled(self) -> bool:
        return self.gram_weight > 0

    @model_validator(mode="after")
    def _check_gram(self) -> "LossConfig":
        if self.gram_weight < 0:
            raise ValueError("loss.gram_weight must be >= 0 (0 = no Gram anchoring)")
        if self.gram_remove_neg and self.gram_remove_only_teacher_neg:
            raise ValueError("loss.gram_remove_neg and loss.gram_remove_only_teacher_neg exclude each other")
        if self.gram_tokens_used != "all" and self.gram_img_level:
            raise ValueError(f"loss.gram_tokens_used={self.gram_tokens_used!r} needs loss.gram_img_level=false")
        if self.gram_teacher == "ema":
            set_ = [n for n in ("gram_teacher_path", "gram_first_refresh", "gram_teacher_crops_size")
                    if getattr(self, n) is not None]
            if set_:
                raise ValueError(f"loss.gram_teacher=ema uses the EMA teacher on the global crops; "
                                 f"{', '.join('loss.' + n for n in set_)} apply to the frozen teacher only")
        if self.gram_first_refresh is not None and self.gram_first_refresh < 1:
            raise ValueError("loss.gram_first_refresh must be >= 1 (a step count), or null for no refresh")
        if self.gram_refresh_every < 1:
            raise ValueError("loss.gram_refresh_every must be >= 1")
        if self.gram_max_refreshes is not None and self.gram_max_refreshes < 0:
            raise ValueError("loss.gram_max_refreshes must be >= 0, or null for no limit")
        if self.gram_teacher_crops_size is not None and self.gram_teacher_crops_size < 1:
            raise ValueError("loss.gram_teacher_crops_size must be a positive size in pixels")
        if self.gram_resize_antialias and self.gram_resize_method == "nearest":
            raise ValueError("loss.gram_resize_antialias needs gram_resize_method bicubic or bilinear")
        return self


class OptimConfig(_Section):
    base_lr: float = Field(2e-4, gt=0)  # at a global batch of `lr_reference_batch`, scaled by sqrt(batch / reference)
    lr_reference_batch: int = Field(1024, ge=1)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(0.1, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.2, ge=0)
    clip_grad: float | None = Field(3.0, ge=0)  # 0 or null = no clipping
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    layerwise_decay: float = Field(1.0, gt=0, le=1)
    freeze_last_layer_epochs: float = Field(0.0, ge=0)
    momentum_teacher: float = Field(0.994, ge=0, le=1)
    final_momentum_teacher: float = Field(1.0, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum_steps: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise FieldError("optim.betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        return self


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    iters_per_epoch: int = Field(3200, ge=1)
    batch_size_per_worker: int = Field(280, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    # torch intra-op threads per worker on CPU; None = cpus_per_worker. May exceed the Ray reservation when
    # the data tasks leave cores idle (tiny_cpu: 1 CPU reserved, 2 threads, measured 1.5x img/s on 2 cores).
    torch_threads: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast on GPU only; CPU runs fp32
    seed: int = 0
    storage_path: str | None = None  # None: $REDDINO_HOME/runs (reddino.paths); any pyarrow URI on a cluster
    run_name: str | None = None
    checkpoint_every: int = Field(500, ge=0)  # steps; 0 = only at the end
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)  # -1: retry forever (Ray Train)
    # Custom Ray resources each Train worker asks for besides CPU/GPU, e.g. {train: 1}: one worker per node that
    # advertises `train: 1` (cluster/ray-cluster.yaml's gpu_worker; the local multi-node helper's train nodes).
    worker_resources: dict[str, float] | None = None
    log_every: int = Field(10, ge=1)
    monitor_every: int = Field(50, ge=0)  # 0 = off; teacher entropy + RankMe, and the collapse guard on them
    # Collapse guard, from the end of the lr warm-up: a sign seen at 2 monitor steps in a row warns once (console
    # + MLflow tag reddino.collapse_warning), or stops the run cleanly with collapse_stop.
    collapse_rankme_frac: float = 0.1  # RankMe ≤ this × min(batch rows, embed dim)
    collapse_uniform_frac: float = 0.95  # mean per-image teacher entropy ≥ this × ln K: uniform targets
    collapse_marginal_frac: float = 0.1  # entropy of the batch-mean target ≤ this × ln min(K, B): one prototype
    collapse_stop: bool = False
    # teacher backbone export; default <run dir>/backbone.safetensors. "{run_name}" is filled in (a sweep needs it:
    # one file per trial).
    export_path: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        _check_custom_resources("train.worker_resources", self.worker_resources)
        return self


class EvalHookConfig(_Section):
    """In-training kNN score of the teacher on a fixed labelled set (the sweep tunes on it)."""

    data: str | None = None
    every: int = Field(0, ge=0)  # steps; 0 = only at the end (if data is set)
    max_images: int = Field(2000, ge=1)
    k: int = Field(20, ge=1)
    exclude_labels: list[int] | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # feature extraction; auto: bf16 where native

    @property
    def metric(self) -> str:
        """The in-training score every consumer shows (live line, curve, sweep metric): kNN-``k`` balanced accuracy."""
        return knn_metric(self.k)


def knn_metric(k: int) -> str:
    return f"eval_knn{int(k)}_balanced_accuracy"


class DistillConfig(_Section):
    """Feature distillation from a frozen teacher (`reddino distill`; reddino.model.distill). Off while teacher
    is None (then the run is DINOv2 pretraining)."""

    teacher: str | None = None  # local weights file: a reddino export, or an official file with teacher_arch
    teacher_arch: str | None = None  # timm arch of an official DINOv2/DINOv3 (non-export) teacher file
    teacher_img_size: int | None = None  # the teacher sees the student's view resized to this; None: the same view
    teacher_precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device computes it natively
    loss: Literal["mse", "cosine"] = "mse"  # see reddino.model.distill for why MSE
    weight: float = Field(1.0, ge=0)  # weight of the distillation term
    patch_weight: float = Field(1.0, ge=0)  # patch-feature term relative to the global one; 0 = global only
    ssl_weight: float = Field(0.0, ge=0)  # weight of the DINOv2 objective (loss.*) added to it; 0 = pure distillation

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.teacher and self.weight == 0 and self.ssl_weight == 0:
            raise ValueError("distill.weight and distill.ssl_weight are both 0: nothing to train")
        return self


class MLflowConfig(_Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under ~/.reddino
    experiment: str = "reddino-pretrain"
    enabled: bool = True


class RunConfig(_Section):
    """A whole pretraining run."""

    name: str = "reddino"
    data: DataConfig = Field(default_factory=DataConfig)
    crops: CropConfig = Field(default_factory=CropConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalHookConfig = Field(default_factory=EvalHookConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        patch, why = self.model.patch_size, "model.patch_size"
        if patch is None:  # the architecture's own, from its timm name (vit_small_patch14_dinov2 → 14)
            found = re.search(r"patch(\d+)", self.model.arch)
            patch, why = (int(found.group(1)), f"model.arch {self.model.arch}") if found else (None, "")
        if patch:
            for key, size in self._input_sizes():
                if size % patch:
                    raise FieldError(key, f"must be a multiple of the patch size {patch} ({why}), got {size}",
                                     related=("model.patch_size", "model.arch"))
        self._check_conv_stride()
        if self.crops.local_crops_number and self.crops.local_crops_size >= self.crops.global_crops_size:
            raise FieldError("crops.local_crops_size", f"must be smaller than crops.global_crops_size "
                             f"({self.crops.global_crops_size}), got {self.crops.local_crops_size}",
                             related=("crops.global_crops_size",))
        for key, value in (("optim.warmup_epochs", self.optim.warmup_epochs),
                           ("optim.freeze_last_layer_epochs", self.optim.freeze_last_layer_epochs)):
            if value > self.train.epochs:
                raise FieldError(key, f"must be <= train.epochs ({self.train.epochs}), the run's length; got {value}",
                                 related=("train.epochs",))
        return self

    def _input_sizes(self) -> list[tuple[str, int]]:
        """(key, size) of every image size the backbone sees: the model's own and each crop in use."""
        sizes = [("model.img_size", self.model.img_size), ("crops.global_crops_size", self.crops.global_crops_size)]
        if self.crops.local_crops_number:
            sizes.append(("crops.local_crops_size", self.crops.local_crops_size))
        return sizes

    def _check_conv_stride(self) -> None:
        # A ConvNeXt downsamples by 32 (timm's default; `output_stride` 16 or 8 dilates the last stages instead):
        # a smaller crop would fail at the first step inside a worker.
        if not self.model.arch.startswith("convnext"):
            return
        stride = int((self.model.timm_kwargs or {}).get("output_stride", 32))
        for key, size in self._input_sizes():
            if size < stride:
                raise FieldError(key, f"must be at least the total stride {stride} of {self.model.arch} "
                                 f"(model.timm_kwargs output_stride), got {size}",
                                 related=("model.arch", "model.timm_kwargs"))

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.train.iters_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for MLflow params."""
        return _flatten(self.to_dict())

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self, path: str | Path) -> Path:
        from reddino.paths import write_text_atomic

        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


class EvalConfig(_Section):
    """A frozen-feature evaluation (`reddino evaluate`; the CLI options are these fields)."""

    protocol: Literal["kfold", "fixed", "cross-source"] = Field(
        "kfold", description="kfold (RedDino), fixed split, or cross-source (leave-one-source-out + source x source matrix).")
    folds: int = Field(5, ge=2, description="CV folds (kfold, and the cross-source matrix diagonal).")
    ks: list[int] = Field(default_factory=lambda: [1, 20], description="kNN k (repeatable).")
    cosine_knn: bool = Field(True, description="Also the DINOv2 cosine kNN (T=0.07).")
    probe: bool = Field(True, description="Logistic-regression probe (RedDino lambda).")
    probe_sweep: bool = Field(False, description="Pick the probe's C on an inner split.")
    pooling: Literal["cls", "cls+mean"] = Field(
        "cls", description="cls (RedDino) or cls+mean (CLS concatenated with the mean patch token).")
    img_size: int | None = Field(None, description="Input size (default: the model's own).")
    exclude_classes: list[int] | None = Field(None, description="Drop these labels (repeatable).")
    report_both_excluded: list[int] | None = Field(
        None, description="Also report every dataset without these labels (e.g. Chula class 12).")
    max_images: int | None = Field(None, description="Deterministic subset of at most this many labelled cells per dataset.")
    use_groups: bool = Field(True, description="Keep each smear/slide (`group`) on one side of a split.")
    split_column: str | None = Field(None, description="fixed: column whose value --test-value marks test rows.")
    test_value: str = Field("test", description="fixed: the --split-column value of test rows.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="fixed without --split-column: grouped stratified holdout fraction.")
    seed: int = Field(0, description="Seed of folds, subsets, random init and UMAP.")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Feature extraction: auto = bf16 autocast where the device computes bf16 natively, else fp32.")
    num_cpus: int | None = Field(None, description="CPUs for the local Ray (default: all).")
    use_ray: bool | None = Field(
        None, description="Ray Data batch inference (true) or in-process extraction (false); default: Ray from 5,000 cells up.")
    cache_dir: str | None = Field(
        "default", description="Embedding store root, also searched for `reddino embed` outputs of the same model and "
        "data ('default': $REDDINO_HOME/cache/features; null: nothing read or kept).")
    out_dir: str | None = Field(None, description="Output dir (default ./eval/<timestamp>).")
    mlflow: bool = Field(True, description="Log an MLflow evaluation run.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite).")
    experiment: str = Field("reddino-eval", description="MLflow experiment.")
    embedding: Literal["umap", "pca", "none"] = Field("umap", description="2-D feature map for the figures.")
    embedding_max: int = Field(3000, description="At most this many points in the 2-D map.")
    figures: bool = Field(True, description="Write confusion matrices and feature maps.")
    progress: bool = Field(True, description="Progress bars on stderr.")


class SweepConfig(_Section):
    """A sweep (`reddino sweep`; saved as sweep.yaml in the sweep dir, which `--resume` reads back)."""

    space: str = Field("ablation", description="Sweep-space YAML or shipped name (reddino/configs/sweeps).")
    data: list[str] | None = Field(None, description="Training Parquet dirs (patches and/or cells).")
    eval_data: str | None = Field(None, description="Labelled cell Parquet dir for kNN scoring.")
    trials: int = Field(8, ge=1, description="Number of trials (search mode).")
    concurrency: int = Field(1, ge=1, description="Trials running at once.")
    mode: Literal["search", "ablation"] = Field(
        "search", description="search (Optuna TPE + ASHA) or ablation (one factor at a time).")
    seed: int = Field(0, description="Seed of the sampler and of every trial's training.")
    seeds: int = Field(1, ge=1, description="Runs per ablation arm, seeds seed, seed+1, ... (ablation mode).")
    final_eval: bool = Field(
        True, description="Ablation: after training, evaluate every arm's backbone with the full protocol on the "
        "eval data (kfold, 5 folds grouped by smear, kNN-1/kNN-20/probe; the run config's eval.exclude_labels).")
    cpus_per_trial: float | None = Field(None, description="CPUs reserved by each trial's driver.")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs (or a fraction) reserved per trial.")
    optuna_storage: str | None = Field(
        None, description="SQLAlchemy URL of the Optuna study (default: sqlite:///<sweep dir>/optuna.db).")
    overrides: list[str] = Field(default_factory=list, description="key=value run-config overrides for every trial.")

    def to_yaml(self, path: str | Path) -> Path:
        from reddino.paths import write_text_atomic

        return write_text_atomic(path, yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _read_yaml(p: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return raw


def _section_of(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class at `loc` inside `cls` (``("train",)`` → TrainConfig), None past a leaf."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        cls = sub
    return cls


def _error_line(cls: type[BaseModel], err: dict[str, Any], where: str, cmdline: set[str]) -> str:
    """One line per problem: the key, the value given, where it came from and what is valid."""
    cause = (err.get("ctx") or {}).get("error")
    loc = tuple(str(x) for x in err["loc"] if not isinstance(x, int))
    key = cause.key if isinstance(cause, FieldError) else ".".join(loc)
    keys = (key, *cause.related) if isinstance(cause, FieldError) else (key,)
    origin = "command line" if any(x == k or x.startswith(k + ".") or k.startswith(x + ".")
                                   for k in cmdline for x in keys) else where
    if isinstance(cause, FieldError):
        return f"{key} ({origin}): {cause.reason}"
    value = err.get("input")
    shown = json.dumps(value) if isinstance(value, (list, dict)) else value
    if err["type"] == "extra_forbidden":
        section = _section_of(cls, loc[:-1])
        valid = sorted(section.model_fields) if section else []
        prefix = ".".join(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
        return (f"{key}={shown} ({origin}): unknown key; {hint}valid keys"
                f"{' of ' + prefix if prefix else ''}: {', '.join(valid)}")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a section's own check: its message names the field
        return f"{key} ({origin}): {msg}"
    expected = ""
    section = _section_of(cls, loc[:-1])
    field = section.model_fields.get(loc[-1]) if section and loc else None
    if field is not None and err["type"].endswith(("_type", "_parsing", "literal_error", "enum")):
        expected = f" (expected {_type_name(field.annotation)})"
    return f"{key}={shown} ({origin}): {msg}{expected}"


def _type_name(annotation: Any) -> str:
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in args)
    if args:
        return " | ".join(_type_name(a) for a in args)
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _validate(cls: type[_Section], data: dict[str, Any], where: str, what: str, cmdline: set[str] = frozenset()):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"invalid {what}: {_error_line(cls, err, where, cmdline)}"
                                     for err in exc.errors())) from None


def load_section(cls: type[_Section], path: str | Path | None = None, updates: dict[str, Any] | None = None):
    """A config of type ``cls`` from a YAML file (optional) updated by ``updates``; errors name the file and field."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path).expanduser()
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{where}: config file not found")
        raw = _read_yaml(p)
    return _validate(cls, {**raw, **(updates or {})}, where, cls.__name__, set(updates or {}))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the file and field (one line per problem)."""


class FieldError(ValueError):
    """A value a validator rejects, with the dotted key it belongs to (the error line names it)."""

    def __init__(self, key: str, reason: str, related: tuple[str, ...] = ()) -> None:
        super().__init__(f"{key} {reason}")
        self.key, self.reason, self.related = key, reason, related


def resolve_config_path(path: str | Path) -> Path:
    """A path, or the name of a shipped preset (``tiny_cpu`` → reddino/configs/tiny_cpu.yaml)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", CONFIG_DIR / p.name):
        if candidate.is_file():
            return candidate
    presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file not found: {path} (shipped presets: {', '.join(presets)})")


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=2", "crops.global_crops_scale=[0.3,1]"]`` → nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read a YAML preset/file, apply overrides, validate. Errors name the file and the field."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = resolve_config_path(path)
        where = str(p)
        raw = _read_yaml(p)
    update = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return _validate(RunConfig, deep_merge(raw, update), where, "config", set(_flatten(update)))
