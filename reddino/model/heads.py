"""The DINO / iBOT projection head.

DINO (Caron et al., ICCV 2021) and DINOv2 (Oquab et al., TMLR 2024): an MLP projects the backbone token to a
bottleneck, which is L2-normalised and scored against ``out_dim`` prototypes by a weight-normalised linear
layer without bias. The scores are the logits of the self-distillation loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP (GELU) → bottleneck → L2-normalise → weight-normed prototypes (no bias).

    The "last layer" (``last_layer.*`` parameters: the weight-norm magnitude ``original0`` and direction
    ``original1``) is what DINO freezes during the first epochs (``optim.freeze_last_layer_epochs``: its parameter
    group gets lr 0, see :class:`reddino.train.step.TrainStep`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        nlayers = max(int(nlayers), 1)

        def hidden(d_in: int) -> list[nn.Module]:
            # DINO's use_bn_in_head: BatchNorm after each hidden layer (see DINOv2SSL.train for the teacher)
            return [nn.Linear(d_in, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]

        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = hidden(in_dim)
            for _ in range(nlayers - 2):
                layers += hidden(hidden_dim)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = weight_norm(last)
        with torch.no_grad():  # unit-norm prototypes: logits are cosine similarities
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        # The norm stays frozen at 1 (DINO's norm_last_layer): a trainable norm under weight decay shrinks
        # every logit toward 0, the student turns uniform and the DINO loss sits at ln K (measured).
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.out_dim = out_dim

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)

    @staticmethod
    def is_last_layer(param_name: str) -> bool:
        """Whether a (possibly prefixed) parameter name belongs to a head's last layer."""
        return "last_layer." in param_name
