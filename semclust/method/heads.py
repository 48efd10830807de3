"""The light clustering heads f_I and f_T (TAC): Linear(D, H) -> BN -> ReLU -> Linear(H, K)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.batchnorm_relu import covered


class ClusterHead(nn.Module):
    """Maps [B, D] features to [B, K] cluster logits (softmax gives the assignment)."""

    def __init__(self, dim: int, k: int, hidden: int = 512) -> None:
        super().__init__()
        self.dim, self.k, self.hidden = dim, k, hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, k))
        # small weights (TAC's init) and no output bias: training starts from near-uniform
        # assignments, so no cluster is favoured by the draw; torch's default init gave one
        # seed a merged pair of classes it never left (gap scenario, seed 0: ACC 0.815
        # against 0.963), and a random output bias alone decides an undertrained head's argmax
        nn.init.trunc_normal_(self.net[0].weight, std=0.02)
        nn.init.trunc_normal_(self.net[3].weight, std=0.02)
        nn.init.zeros_(self.net[3].bias)

    def forward(self, x: Tensor) -> Tensor:
        lin1, bn, _, lin2 = self.net
        # SyncBatchNorm (torch.distributed) and a forced backend without the op run the modules
        if type(bn) is not nn.BatchNorm1d or not covered(x.device):
            return self.net(x)
        # BN and ReLU as one op: on the CPU the ext backend fuses their forward and their
        # backward (four torch passes otherwise; a stage-1 step 6-8% faster at K = 10)
        h = ops.batchnorm_relu(lin1(x), bn.weight, bn.bias, bn.running_mean, bn.running_var, training=bn.training,
                               momentum=bn.momentum, eps=bn.eps, num_batches_tracked=bn.num_batches_tracked)
        return lin2(h)


class ResidualAdapter(nn.Module):
    """z = normalise(u + B relu(A u)), B zero-initialised so training starts at identity.

    Stage 2's stand-in for encoder fine-tuning when only frozen embeddings are given.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: Tensor) -> Tensor:
        return nn.functional.normalize(u + self.up(torch.relu(self.down(u))), dim=-1)


class Heads(nn.Module):
    """The image and text heads together, with the fused prediction."""

    def __init__(self, dim: int, k: int, hidden: int = 512) -> None:
        super().__init__()
        self.image = ClusterHead(dim, k, hidden)
        self.text = ClusterHead(dim, k, hidden)

    def forward(self, x_image: Tensor, x_text: Tensor) -> tuple[Tensor, Tensor]:
        """(f_I(x_image), f_T(x_text)) logits; one call, so DDP sees one forward per step."""
        return self.image(x_image), self.text(x_text)

    @torch.no_grad()
    def _proba(self, u: Tensor, v: Tensor | None) -> Tensor:
        p = torch.softmax(self.image(u.float()), dim=1)
        if v is not None:
            p = 0.5 * (p + torch.softmax(self.text(v.float()), dim=1))
        return p

    @torch.no_grad()
    def predict_proba(self, u: Tensor, v: Tensor | None, chunk_size: int = 65536) -> Tensor:
        """[N, K] mean of the two heads' softmax (image head alone when v is None)."""
        was = self.training
        self.eval()
        out = torch.cat([self._proba(u[s : s + chunk_size], None if v is None else v[s : s + chunk_size])
                         for s in range(0, u.shape[0], chunk_size)])
        self.train(was)
        return out

    @torch.no_grad()
    def predict(self, u: Tensor, v: Tensor | None, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
        """(labels [N], confidences [N]) of the fused prediction; only a [chunk, K] block of
        probabilities exists at a time."""
        was = self.training
        self.eval()
        conf, labels = [], []
        for s in range(0, u.shape[0], chunk_size):
            c, l = self._proba(u[s : s + chunk_size], None if v is None else v[s : s + chunk_size]).max(1)
            conf.append(c)
            labels.append(l)
        self.train(was)
        return torch.cat(labels), torch.cat(conf)
