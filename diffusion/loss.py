"""Denoising score matching with periodic wrapping.

For x_t = wrap(x_0 + σε), the regression target is the minimum-image displacement
d = mic(x_t − x_0) (≈ σε): ∇ log p(x_t|x_0) = −d/σ². With the σ²-weighting of score matching,
the per-atom loss is |σ·s_θ(x_t, σ) + d/σ|², which is O(1) at every noise level.
"""

from __future__ import annotations

import torch
from torch_geometric.utils import scatter


def dsm_loss(score_1_per_A: torch.Tensor, displacement_A: torch.Tensor, sigma_A: torch.Tensor,
             batch: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over cells of the per-atom mean of |σ s + d/σ|² (summed over x, y, z).

    score_1_per_A (N,3), displacement_A (N,3), sigma_A (N,) per atom.
    """
    sigma = sigma_A.reshape(-1, 1)
    per_atom = (sigma * score_1_per_A + displacement_A / sigma).pow(2).sum(-1)
    if batch is None:
        return per_atom.mean()
    return scatter(per_atom, batch, dim=0, reduce="mean").mean()
