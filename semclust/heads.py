"""The light clustering heads f_I and f_T (TAC): Linear(D, H) -> BN -> ReLU -> Linear(H, K)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClusterHead(nn.Module):
    """Maps [B, D] features to [B, K] cluster logits (softmax gives the assignment)."""

    def __init__(self, dim: int, k: int, hidden: int = 512) -> None:
        super().__init__()
        self.dim, self.k, self.hidden = dim, k, hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, k))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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

    @torch.no_grad()
    def predict_proba(self, u: Tensor, v: Tensor | None, chunk_size: int = 65536) -> Tensor:
        """Mean of the two heads' softmax (image head alone when v is None), in chunks."""
        was = self.training
        self.eval()
        out = []
        for s in range(0, u.shape[0], chunk_size):
            p = torch.softmax(self.image(u[s : s + chunk_size].float()), dim=1)
            if v is not None:
                p = 0.5 * (p + torch.softmax(self.text(v[s : s + chunk_size].float()), dim=1))
            out.append(p)
        self.train(was)
        return torch.cat(out)
