"""DINOv2 student/teacher self-supervised learner (Oquab et al., TMLR 2024), as used by RedDino.

The student sees all crops (global crops with iBOT masks, local crops unmasked) and is trained by
back-propagation; the teacher sees the unmasked global crops only, under ``no_grad``, and follows the
student by EMA (:meth:`DINOv2SSL.update_teacher`). Losses:

* DINO on CLS tokens: teacher global crop ``i`` vs student crop ``j ≠ i`` (global and local).
* iBOT on the masked patch tokens of the global crops.
* KoLeo on the student's global CLS tokens, per global crop and summed over them as in DINOv2 (skipped
  entirely when its weight is 0, RedDino's setting).
* Gram anchoring (DINOv3, ``loss.gram_*``; :mod:`reddino.model.gram`), when on: the student's patch tokens of the
  global crops against those of a frozen Gram teacher (``gram_teacher``, a backbone without heads, refreshed from
  the EMA teacher by :meth:`DINOv2SSL.refresh_gram_teacher`) or of the EMA teacher itself.

DDP: wrap the whole module (``broadcast_buffers=False``). The teacher has ``requires_grad=False`` and is
never touched by autograd. Every student parameter receives a gradient each step, including the mask
token (masks default to all-False, so it is always in the graph; a ConvNeXt, which is never masked, freezes it) and a separate iBOT head (run even on
zero masked tokens), so ``find_unused_parameters`` is not needed. Call ``update_teacher`` on ``ddp.module``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from reddino.config import LossConfig, ModelConfig, OptimConfig
from reddino.model import family
from reddino.model.backbone import backbone_tokens, create_backbone, load_pretrained
from reddino.model.gram import GramAnchoringLoss
from reddino.model.heads import DINOHead
from reddino.model.losses import DINOLoss, DINOv2Loss, IBOTPatchLoss


class DINOv2SSL(nn.Module):
    """Student + EMA teacher, each ``nn.ModuleDict(backbone=..., dino_head=..., [ibot_head=...])``.

    ``mask_token`` ([1, D]) is a student parameter (the teacher is never masked). After each ``forward``,
    ``last_teacher_cls`` ([G·B, D], teacher final-norm CLS of the global crops) and ``last_teacher_probs``
    ([G·B, K], centred teacher CLS probabilities) hold detached copies for the monitors; set
    ``keep_monitor_outputs = False`` to save that memory.

    With Gram anchoring on (``loss_cfg.gram_enabled``), ``gram`` is the Gram objective, ``gram_teacher`` the frozen
    Gram teacher backbone (``loss.gram_teacher=frozen``: ``gram_teacher`` if given, else a copy of the model at
    construction) and the buffer ``gram_refreshes`` counts its refreshes; both are in the state dict, so
    checkpoints carry them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dino_head: DINOHead,
        ibot_head: DINOHead | None = None,
        loss_cfg: LossConfig | None = None,
        mask_token: torch.Tensor | None = None,
        gram_teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.loss_cfg = loss_cfg or LossConfig()
        if self.loss_cfg.ibot_weight > 0:
            family.require_ibot(backbone)  # a ConvNeXt has no patch tokens to mask
        self.masking = family.family_of(backbone).mask
        embed_dim = family.embed_dim(backbone)
        student = nn.ModuleDict({"backbone": backbone, "dino_head": dino_head})
        if ibot_head is not None:
            student["ibot_head"] = ibot_head
        self.student = student
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        if mask_token is not None:
            with torch.no_grad():
                self.mask_token.copy_(mask_token.reshape(1, embed_dim))
        if not self.masking:  # a ConvNeXt never uses it: frozen, so DDP expects no gradient for it
            self.mask_token.requires_grad_(False)
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

        ibot_dim = ibot_head.out_dim if ibot_head is not None else dino_head.out_dim
        self.objective = DINOv2Loss(dino_head.out_dim, ibot_dim, self.loss_cfg)
        self.keep_monitor_outputs = True
        self.last_teacher_cls: torch.Tensor | None = None
        self.last_teacher_probs: torch.Tensor | None = None

        lc = self.loss_cfg
        self.gram: GramAnchoringLoss | None = GramAnchoringLoss(lc) if lc.gram_enabled else None
        self.gram_teacher: nn.Module | None = None
        if self.gram is not None and lc.gram_teacher == "frozen":
            self.gram_teacher = gram_teacher if gram_teacher is not None else copy.deepcopy(self.teacher["backbone"])
            for p in self.gram_teacher.parameters():
                p.requires_grad_(False)
            self.gram_teacher.eval()
        elif gram_teacher is not None:
            raise ValueError("a gram_teacher was given but the loss config has no frozen Gram teacher")
        if self.gram is not None:
            self.register_buffer("gram_refreshes", torch.zeros((), dtype=torch.long))

    @property
    def dino_loss(self) -> DINOLoss:
        return self.objective.dino

    @property
    def ibot_loss(self) -> IBOTPatchLoss:
        return self.objective.ibot

    # ----------------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        model_cfg: ModelConfig,
        loss_cfg: LossConfig | None = None,
    ) -> "DINOv2SSL":
        """Build backbone (warm-started from ``model_cfg.pretrained`` if set) and random heads.

        A separate iBOT head is built only if ``ibot_separate_head`` and the iBOT weight is > 0. A frozen Gram
        teacher starts from ``loss_cfg.gram_teacher_path`` when set (same architecture, strict load), else as a
        copy of the warm-started backbone.
        """
        loss_cfg = loss_cfg or LossConfig()
        backbone = create_backbone(model_cfg.arch, model_cfg.img_size, model_cfg.patch_size, model_cfg.drop_path_rate,
                                   model_cfg.timm_kwargs)
        if loss_cfg.ibot_weight > 0:
            family.require_ibot(backbone)
        mask_token = load_pretrained(backbone, model_cfg.pretrained) if model_cfg.pretrained else None
        dim = family.embed_dim(backbone)
        head_kw = dict(
            hidden_dim=model_cfg.head_hidden_dim,
            bottleneck_dim=model_cfg.head_bottleneck_dim,
            nlayers=model_cfg.head_nlayers,
            use_bn=model_cfg.head_use_bn,
        )
        dino_head = DINOHead(dim, model_cfg.head_prototypes, **head_kw)
        ibot_head = None
        if model_cfg.ibot_separate_head and loss_cfg.ibot_weight > 0:
            # no BatchNorm here: a batch may mask zero or one patch token
            ibot_head = DINOHead(dim, model_cfg.ibot_head_prototypes or model_cfg.head_prototypes,
                                 **{**head_kw, "use_bn": False})
        gram_teacher = None
        if loss_cfg.gram_enabled and loss_cfg.gram_teacher == "frozen" and loss_cfg.gram_teacher_path:
            gram_teacher = create_backbone(model_cfg.arch, model_cfg.img_size, model_cfg.patch_size,
                                           timm_kwargs=model_cfg.timm_kwargs)
            with warnings.catch_warnings():  # "no mask_token": the Gram teacher is never masked
                warnings.filterwarnings("ignore", message=".*mask_token")
                load_pretrained(gram_teacher, loss_cfg.gram_teacher_path)
        return cls(backbone, dino_head, ibot_head, loss_cfg, mask_token=mask_token, gram_teacher=gram_teacher)

    def train(self, mode: bool = True) -> "DINOv2SSL":
        super().train(mode)
        self.teacher.eval()  # no drop-path / dropout in the teacher
        if self.gram_teacher is not None:
            self.gram_teacher.eval()  # DINOv3: also no RoPE coordinate augmentation
        if mode:  # ... but head BatchNorm normalises with batch statistics, as in DINO (never-updated running
            for m in self.teacher.modules():  # stats would be the identity)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        return self

    @property
    def patch_size(self) -> int:
        return family.token_stride(self.student["backbone"])

    # ----------------------------------------------------------------------------------------------------------

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        teacher_temp: float | None = None,
        gram_crops: torch.Tensor | None = None,
        gram_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``global_crops`` [B, G, 3, S, S], ``local_crops`` [B, L, 3, s, s] or None, ``masks`` [B, G, N] bool
        or None (no masking) → (total loss, detached parts ``dino``, ``ibot``, ``koleo``, ``masked_fraction``).

        With Gram anchoring on and ``gram_weight`` > 0 the total gains ``gram_weight`` × the Gram loss (part
        ``gram``, unweighted). ``gram_crops`` [B, G, 3, T, T]: the Gram teacher's view of the global crops, needed
        when ``loss.gram_teacher_crops_size`` is set; at weight 0 nothing of Gram is computed."""
        lc = self.loss_cfg
        temp = float(lc.teacher_temp if teacher_temp is None else teacher_temp)
        B, G = global_crops.shape[:2]
        x_g = global_crops.transpose(0, 1).flatten(0, 1)  # crop-major: [G·B, 3, S, S], crop i = rows i·B:(i+1)·B
        L = 0 if local_crops is None or local_crops.numel() == 0 else int(local_crops.shape[1])
        x_l = local_crops.transpose(0, 1).flatten(0, 1) if L else None
        ps = self.patch_size
        n_tokens = (x_g.shape[-2] // ps) * (x_g.shape[-1] // ps)
        if masks is None or not self.masking:  # ConvNeXt: nothing to mask (iBOT is refused at construction)
            m = torch.zeros(G * B, n_tokens, dtype=torch.bool, device=x_g.device)
        else:
            if tuple(masks.shape) != (B, G, n_tokens):
                raise ValueError(f"masks {tuple(masks.shape)} != (B, G, N) = {(B, G, n_tokens)}")
            m = masks.to(device=x_g.device, dtype=torch.bool).transpose(0, 1).flatten(0, 1)
        do_ibot = lc.ibot_weight > 0
        shared = "ibot_head" not in self.student

        # --- teacher: unmasked global crops, no grad --------------------------------------------------------
        with torch.no_grad():
            t = backbone_tokens(self.teacher["backbone"], x_g)
            t_masked = t["patch"][m]  # [M, D]
            if do_ibot and shared:
                t_out = self.teacher["dino_head"](torch.cat([t["cls"], t_masked]))
                t_cls_logits, t_patch_logits = t_out[: G * B], t_out[G * B :]
            else:
                t_cls_logits = self.teacher["dino_head"](t["cls"])
                t_patch_logits = self.teacher["ibot_head"](t_masked) if do_ibot else None
            t_cls_probs, t_patch_probs = self.objective.teacher_targets(t_cls_logits, t_patch_logits, temp)
            if self.keep_monitor_outputs:
                self.last_teacher_cls = t["cls"].detach().float()
                self.last_teacher_probs = t_cls_probs.detach()

        # --- student: masked global crops + unmasked local crops ----------------------------------------------
        s = backbone_tokens(self.student["backbone"], x_g, m, self.mask_token)
        s_cls = [s["cls"]]
        if L:
            s_cls.append(backbone_tokens(self.student["backbone"], x_l)["cls"])
        s_masked = s["patch"][m]
        n_cls = (G + L) * B
        if do_ibot and shared:
            s_out = self.student["dino_head"](torch.cat(s_cls + [s_masked]))
            s_cls_logits, s_patch_logits = s_out[:n_cls], s_out[n_cls:]
        else:
            s_cls_logits = self.student["dino_head"](torch.cat(s_cls))
            s_patch_logits = self.student["ibot_head"](s_masked) if do_ibot else None

        total, parts = self.objective(s_cls_logits, t_cls_probs, G, s_patch_logits, t_patch_probs, m,
                                      s["cls"] if lc.koleo_weight > 0 else None)
        # on the device, no int(): a host sync per step on a GPU, and a graph break under torch.compile
        parts["masked_fraction"] = m.float().mean() if m.numel() else torch.zeros((), device=total.device)
        if self.gram is not None and gram_weight > 0:
            gram = self.gram(s["patch"], self._gram_teacher_patches(t["patch"], x_g, gram_crops), m)
            total = total + float(gram_weight) * gram
            parts["gram"] = gram.detach().float()
        elif gram_weight > 0:
            raise ValueError("gram_weight > 0 but Gram anchoring is off in the loss config")
        return total, parts

    @torch.no_grad()
    def _gram_teacher_patches(
        self, ema_patches: torch.Tensor, x_g: torch.Tensor, gram_crops: torch.Tensor | None
    ) -> torch.Tensor:
        """The Gram teacher's final-norm patch tokens of the global crops, crop-major [G·B, N_t, D]."""
        if self.gram_teacher is None:  # loss.gram_teacher=ema: the EMA teacher's tokens of the same crops
            return ema_patches
        size = self.loss_cfg.gram_teacher_crops_size
        if size is None:
            x = x_g
        else:
            if gram_crops is None:
                raise ValueError(f"loss.gram_teacher_crops_size={size} but the batch has no gram_crops")
            x = gram_crops.transpose(0, 1).flatten(0, 1)
            if x.shape[0] != x_g.shape[0] or tuple(x.shape[-2:]) != (size, size):
                raise ValueError(f"gram_crops {tuple(gram_crops.shape)} do not match the global crops "
                                 f"(B, G, 3, {size}, {size})")
        return backbone_tokens(self.gram_teacher, x)["patch"]

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """The frozen Gram teacher becomes a copy of the EMA teacher's backbone (DINOv3's Gram teacher update)."""
        if self.gram_teacher is None:
            raise RuntimeError("no frozen Gram teacher to refresh (loss.gram_teacher=frozen with Gram anchoring on)")
        self.gram_teacher.load_state_dict(self.teacher["backbone"].state_dict())
        self.gram_refreshes += 1

    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = m · teacher + (1 − m) · student`` for backbone and heads."""
        s_params = [p.detach() for p in self.student.parameters()]
        t_params = [p for p in self.teacher.parameters()]
        if len(s_params) != len(t_params):
            raise RuntimeError("student and teacher have different parameter lists")
        m = float(momentum)
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)

    def param_groups(self, optim_cfg: OptimConfig | None = None) -> list[dict[str, Any]]:
        """AdamW groups of the student parameters (+ mask token), each with ``lr_mult``, ``wd_mult``,
        ``is_last_layer``; the trainer sets ``lr = lr_t · lr_mult`` and ``weight_decay = wd_t · wd_mult``.

        * ``lr_mult``: layer-wise decay ``d ** (depth + 1 − layer_id)`` (embeddings 0, block i → i + 1, final
          norm and heads → depth + 1), times ``patch_embed_lr_mult`` for the patch embedding.
        * ``wd_mult``: 0 for biases, norms, layer-scale gammas, position/class/register/mask tokens.
        """
        oc = optim_cfg or OptimConfig()
        backbone = self.student["backbone"]
        # timm's own layer grouping (stem 0, block i → i + 1) and no-weight-decay list. timm folds the final norm
        # into the last block; the official DINOv2 puts it with the heads (multiplier 1), and so do we.
        layer_of = family.layer_ids(backbone)
        top = max(layer_of.values(), default=0)
        if family.family_of(backbone).name != "convnext":
            top = len(backbone.blocks) + 1
        no_wd_names = set(getattr(backbone, "no_weight_decay", lambda: ())()) | {"mask_token"}
        stem = family.stem_prefixes(backbone)
        groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
        named = [("mask_token", "mask_token", self.mask_token)] + [
            ("student." + n, n[len("backbone."):] if n.startswith("backbone.") else None, p)
            for n, p in self.student.named_parameters()]
        for name, sub, p in named:
            if not p.requires_grad:
                continue
            lr_mult = 1.0
            if sub is not None:  # a backbone parameter (or the mask token, an embedding)
                layer = 0 if sub == "mask_token" else layer_of.get(sub, top)
                lr_mult = oc.layerwise_decay ** (top - layer)
                if sub.startswith(stem):
                    lr_mult *= oc.patch_embed_lr_mult
            no_wd = p.ndim <= 1 or (sub is not None and sub in no_wd_names)  # biases, norms, gammas, tokens
            key = (float(lr_mult), 0.0 if no_wd else 1.0, DINOHead.is_last_layer(name))
            g = groups.setdefault(
                key, {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1], "is_last_layer": key[2]}
            )
            g["params"].append(p)
            g["names"].append(name)
        return list(groups.values())
