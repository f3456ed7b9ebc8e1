"""Feature distillation: a student backbone learns a frozen teacher's features of the same augmented view.

The objective (:class:`DistillLoss`): the student's global feature (CLS; a ConvNeXt's pooled map) and, where both
models have them, its patch features — resampled bilinearly to the teacher's patch grid — each go through a small
projection (one ``Linear`` from the student's width to the teacher's) and are matched to the teacher's final-norm
features of the same view.

Why MSE by default (``distill.loss``): the published recipes that distil a backbone-only teacher regress its
features. lightly-train's distillation (v2, its default method) applies a plain MSE between the projected student
features and the teacher's features of the same image, student projected by a single linear layer to the teacher's
width (its docs; "A Good Teacher is Patient and Consistent", Beyer et al. 2022, for the same-view, long-schedule
part). DINOv3 distils its ViT-S/B/L and ConvNeXts from the 7B with its own DINO + iBOT losses, i.e. through the
teacher's DINO/iBOT heads; the released DINOv3 and DINOv2 files hold the backbone only (no heads), so that route is
not open to a user with a downloaded teacher, and feature regression is. MSE keeps the teacher's feature norms
(which kNN with the Euclidean metric and linear probes see); ``cosine`` (1 − cos, direction only) is the
alternative for teachers whose feature norms carry nothing (scale-free). Either way the part ``distill_cos`` logs
the mean cosine of the projected student CLS to the teacher's, the number that shows the student learning.

:class:`DistillSSL` plugs the objective into the pretraining loop as a drop-in for
:class:`~reddino.model.ssl.DINOv2SSL` (it is one): same ``forward`` signature, ``update_teacher`` and
``param_groups``; the run's EMA "teacher" is the EMA of the student (what kNN evaluates and what is exported,
as in pretraining), and the frozen distillation teacher is held outside the module's parameters and state dict,
so checkpoints, DDP and the optimizer never carry it (a ViT-L teacher stays out of every checkpoint). With
``distill.ssl_weight`` > 0 the DINOv2 objective (``loss.*``) is added: ``ssl_weight`` × DINO/iBOT/KoLeo +
``distill.weight`` × distillation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reddino.model import family
from reddino.model.backbone import backbone_tokens
from reddino.model.heads import DINOHead
from reddino.model.ssl import DINOv2SSL


def _grid(n_tokens: int, h: int, w: int, stride: int) -> tuple[int, int]:
    """The (rows, cols) token grid of an h×w input at ``stride`` (checked against the token count)."""
    gh, gw = h // stride, w // stride
    if gh * gw != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form the {gh}x{gw} grid of a {h}x{w} input at stride {stride}")
    return gh, gw


class DistillLoss(nn.Module):
    """Projection heads + the matching loss.

    ``forward(s_cls [B, Ds], t_cls [B, Dt], s_patch [B, Ns, Ds] | None, s_grid, t_patch [B, Nt, Dt] | None,
    t_grid)`` → (loss, parts). ``parts``: ``distill_cls``, ``distill_patch`` (when on), ``distill_cos`` (mean cosine
    of the projected student CLS to the teacher's, detached). The teacher features are detached here too.
    """

    def __init__(self, student_dim: int, teacher_dim: int, loss: str = "mse", patch_weight: float = 1.0) -> None:
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ValueError(f"distill.loss must be 'mse' or 'cosine', got {loss!r}")
        self.loss = loss
        self.patch_weight = float(patch_weight)
        self.cls_proj = nn.Linear(student_dim, teacher_dim)
        self.patch_proj = nn.Linear(student_dim, teacher_dim) if self.patch_weight > 0 else None
        for m in (self.cls_proj, self.patch_proj):
            if m is not None:
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _match(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.float(), t.float()
        if self.loss == "mse":
            return F.mse_loss(s, t)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()

    def forward(
        self,
        s_cls: torch.Tensor,
        t_cls: torch.Tensor,
        s_patch: torch.Tensor | None = None,
        s_grid: tuple[int, int] | None = None,
        t_patch: torch.Tensor | None = None,
        t_grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t_cls = t_cls.detach()
        p_cls = self.cls_proj(s_cls)
        total = self._match(p_cls, t_cls)
        parts = {"distill_cls": total.detach().float(),
                 "distill_cos": F.cosine_similarity(p_cls.detach().float(), t_cls.float(), dim=-1).mean()}
        use_patch = (self.patch_proj is not None and s_patch is not None and t_patch is not None
                     and s_patch.shape[1] > 0 and t_patch.shape[1] > 0)
        if use_patch:
            B, _, _ = s_patch.shape
            (sh, sw), (th, tw) = s_grid, t_grid
            p = self.patch_proj(s_patch)  # [B, Ns, Dt]
            p = p.transpose(1, 2).reshape(B, -1, sh, sw)
            if (sh, sw) != (th, tw):  # the student's map resampled to the teacher's grid
                p = F.interpolate(p.float(), size=(th, tw), mode="bilinear", align_corners=False)
            p = p.flatten(2).transpose(1, 2)  # [B, Nt, Dt]
            patch = self._match(p, t_patch.detach())
            total = total + self.patch_weight * patch
            parts["distill_patch"] = patch.detach().float()
        return total, parts


class DistillSSL(DINOv2SSL):
    """A student (with an EMA copy, as in pretraining) distilled from a frozen ``teacher`` backbone.

    ``distill_cfg`` is a :class:`reddino.config.DistillConfig`. With ``ssl_weight`` 0 the DINO head exists only to
    keep the EMA "teacher" a ``DINOv2SSL``: it and the mask token are frozen (no gradient, so DDP needs no
    ``find_unused_parameters``) and may be minimal.
    """

    def __init__(self, backbone: nn.Module, dino_head: DINOHead, teacher: nn.Module, distill_cfg: Any,
                 ibot_head: DINOHead | None = None, loss_cfg=None, mask_token: torch.Tensor | None = None) -> None:
        if float(distill_cfg.ssl_weight) == 0 and loss_cfg is not None:  # no DINOv2 term: no iBOT either
            loss_cfg = loss_cfg.model_copy(update={"ibot_weight": 0.0, "koleo_weight": 0.0, "gram_weight": 0.0,
                                                   "gram_weight_schedule": None})
        super().__init__(backbone, dino_head, ibot_head, loss_cfg, mask_token=mask_token)
        self.distill_cfg = distill_cfg
        self.ssl_weight = float(distill_cfg.ssl_weight)
        self.weight = float(distill_cfg.weight)
        self.teacher_size = distill_cfg.teacher_img_size
        for p in teacher.parameters():
            p.requires_grad_(False)
        # Not a submodule: out of state_dict (checkpoints), parameters() (optimizer, DDP broadcast) and train().
        self.__dict__["distill_teacher"] = teacher.eval()
        self.teacher_dtype: torch.dtype | None = None  # bf16 autocast of the teacher forward (set by from_config)
        self.student["distill_head"] = DistillLoss(family.embed_dim(backbone), family.embed_dim(teacher),
                                                   distill_cfg.loss, distill_cfg.patch_weight)
        if self.ssl_weight == 0:
            for p in [self.mask_token, *self.student["dino_head"].parameters()]:
                p.requires_grad_(False)
            if "ibot_head" in self.student:
                for p in self.student["ibot_head"].parameters():
                    p.requires_grad_(False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.distill_teacher._apply(fn, recurse)  # .to(device) moves the frozen teacher too
        return self

    @classmethod
    def from_config(cls, cfg, teacher: nn.Module | None = None) -> "DistillSSL":  # type: ignore[override]
        """Student from ``cfg.model`` (warm-started from ``model.pretrained`` if set), teacher from
        ``cfg.distill`` (:func:`load_teacher`) unless given."""
        from reddino.model.backbone import create_backbone, load_pretrained

        mc, dc = cfg.model, cfg.distill
        backbone = create_backbone(mc.arch, mc.img_size, mc.patch_size, mc.drop_path_rate, mc.timm_kwargs)
        mask_token = load_pretrained(backbone, mc.pretrained) if mc.pretrained else None
        dim = family.embed_dim(backbone)
        ibot_head = None
        if dc.ssl_weight > 0:
            head_kw = dict(hidden_dim=mc.head_hidden_dim, bottleneck_dim=mc.head_bottleneck_dim,
                           nlayers=mc.head_nlayers, use_bn=mc.head_use_bn)
            dino_head = DINOHead(dim, mc.head_prototypes, **head_kw)
            if cfg.loss.ibot_weight > 0:
                family.require_ibot(backbone)
                if mc.ibot_separate_head:
                    ibot_head = DINOHead(dim, mc.ibot_head_prototypes or mc.head_prototypes,
                                         **{**head_kw, "use_bn": False})
        else:  # never run: a frozen minimal head
            dino_head = DINOHead(dim, 2, hidden_dim=2, bottleneck_dim=2, nlayers=1)
        if teacher is None:
            teacher = load_teacher(dc.teacher, dc.teacher_arch)
        model = cls(backbone, dino_head, teacher, dc, ibot_head, cfg.loss, mask_token=mask_token)
        return model

    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen teacher's final-norm tokens of the (student's) view ``x``, resized to
        ``distill.teacher_img_size`` when set; under bf16 autocast when ``teacher_dtype`` says so."""
        if self.teacher_size and tuple(x.shape[-2:]) != (self.teacher_size, self.teacher_size):
            x = F.interpolate(x, size=(self.teacher_size, self.teacher_size), mode="bilinear", align_corners=False,
                              antialias=True)
        on = self.teacher_dtype is not None
        with torch.autocast(x.device.type, dtype=self.teacher_dtype or torch.bfloat16, enabled=on):
            t = backbone_tokens(self.distill_teacher, x)
        return {k: v.float() for k, v in t.items()} | {"hw": tuple(x.shape[-2:])}

    def distill_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Distillation objective on images ``x`` [N, 3, S, S] (the unmasked global crops) → (loss, parts,
        the student's CLS)."""
        t = self.teacher_tokens(x)
        s = backbone_tokens(self.student["backbone"], x)
        want_patch = self.student["distill_head"].patch_proj is not None
        s_grid = t_grid = None
        if want_patch:
            s_grid = _grid(s["patch"].shape[1], *x.shape[-2:], family.token_stride(self.student["backbone"]))
            t_grid = _grid(t["patch"].shape[1], *t["hw"], family.token_stride(self.distill_teacher))
        loss, parts = self.student["distill_head"](s["cls"], t["cls"], s["patch"] if want_patch else None, s_grid,
                                                   t["patch"] if want_patch else None, t_grid)
        return loss, parts, s["cls"]

    def forward(self, global_crops, local_crops=None, masks=None, teacher_temp=None, gram_crops=None,
                gram_weight: float = 0.0):
        """As :meth:`DINOv2SSL.forward`; the total is ``weight`` × distillation (+ ``ssl_weight`` × DINOv2)."""
        x_g = global_crops.transpose(0, 1).flatten(0, 1)  # crop-major [G·B, 3, S, S]
        d_loss, parts, s_cls = self.distill_loss(x_g)
        total = self.weight * d_loss
        if self.ssl_weight > 0:
            ssl_total, ssl_parts = super().forward(global_crops, local_crops, masks, teacher_temp, gram_crops,
                                                   gram_weight)
            total = total + self.ssl_weight * ssl_total
            parts = {**ssl_parts, **parts}
        elif self.keep_monitor_outputs:  # RankMe / the collapse guard watch the student's features
            self.last_teacher_cls = s_cls.detach().float()
            self.last_teacher_probs = None
        parts["distill"] = d_loss.detach().float()
        return total, parts

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student's backbone and DINO head(s) (the projection heads have no EMA copy)."""
        m = float(momentum)
        for name in self.teacher.keys():
            t_params = list(self.teacher[name].parameters())
            s_params = [p.detach() for p in self.student[name].parameters()]
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - m)


# --------------------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------------------


def load_teacher(ref: str, arch: str | None = None) -> nn.Module:
    """The frozen teacher backbone, in eval mode, from a local weights file.

    ``arch`` None: a reddino export (``load_backbone``, its sidecar names the architecture). ``arch`` set: an
    official DINOv2 / DINOv3 (or timm) state dict loaded into ``create_backbone(arch)`` by the warm-start loader
    (strict). Errors name the file and the reason."""
    from pathlib import Path

    from reddino.model.backbone import create_backbone, load_backbone, load_pretrained

    path = Path(ref).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher {ref}: no such file")
    if arch:
        model = create_backbone(arch, None)
        import warnings

        with warnings.catch_warnings():  # "no mask_token": a frozen teacher is never masked
            warnings.filterwarnings("ignore", message=".*mask_token")
            load_pretrained(model, path)
    else:
        model = load_backbone(path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def check_pair(teacher: nn.Module, student: nn.Module, crop_size: int, teacher_size: int | None,
               teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Refuse a teacher/student pair whose inputs cannot match: each model must tile the view it sees (the
    student: ``crop_size``; the teacher: ``teacher_size`` or the same crop) into whole patches."""
    for name, model, size, knob, is_teacher in (
            (teacher_name, teacher, teacher_size or crop_size,
             "distill.teacher_img_size" if teacher_size else "crops.global_crops_size", True),
            (student_name, student, crop_size, "crops.global_crops_size", False)):
        stride = family.token_stride(model)
        fam = family.family_of(model).name
        if fam == "convnext":
            if size < stride:
                raise ValueError(f"{name}: a {size}-px view is smaller than this ConvNeXt's total stride {stride} "
                                 f"({knob}={size}); use at least {stride} px")
        elif size % stride:
            raise ValueError(f"{name}: {size}-px views do not tile into whole {stride}-px patches ({knob}={size}); "
                             f"use a multiple of {stride}"
                             + (f", or set distill.teacher_img_size to one (the teacher then sees the view resized)"
                                if is_teacher and not teacher_size else ""))


@torch.no_grad()
def check_teacher_output(teacher: nn.Module, size: int, name: str = "teacher", n: int = 2) -> None:
    """One forward of ``n`` fixed random views: a teacher whose features are not finite is refused by name."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    t = backbone_tokens(teacher, x)
    for key in ("cls", "patch"):
        v = t[key]
        if v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{name}: its {key} features are not finite ({bad} of {v.numel()} values NaN/inf on a "
                             f"{size}-px test batch): the weights are damaged or the model diverged; refusing to "
                             "distil from it")
