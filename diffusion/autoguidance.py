"""Autoguidance: a score model pushed away from a weaker model of the same data.

Karras et al., "Guiding a diffusion model with a bad version of itself" (arXiv:2406.02507):

    s(x, σ) = s_good(x, σ) + w · (s_good(x, σ) − s_weak(x, σ))

The weaker model makes the same kind of mistakes as the good one, only more of them, so the
difference points away from what both get wrong (here: five-fold sites in dense cells) without
narrowing the distribution the way a lower temperature does. w = 0 is the good model alone.
Where w > 0 a score call runs both models on the same graph: about twice the cost.

The weight can ramp with each cell's mass density (like the samplers' `DensityCooling`): 0 at or
below `from_g_cm3`, `weight` at or above `to_g_cm3`, linear between; a batch whose cells all get
w = 0 never runs the weaker model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from ase.data import atomic_masses
from torch import nn

from xanesdiff.diffusion.score_model import DensityEmbedding


@dataclass
class Autoguidance:
    """What `load_prior` needs to autoguide a prior (configs give its fields as a mapping).

    `weaker`: a prior checkpoint or shipped name with the prior's cutoff and noise schedule;
    `weight` w ≥ 0; `from_g_cm3` / `to_g_cm3`: the density ramp of w (None: w everywhere)."""

    weaker: str | os.PathLike
    weight: float = 1.0
    from_g_cm3: float | None = None
    to_g_cm3: float | None = None


class AutoguidedScoreModel(nn.Module):
    """`forward` has the signature of `EquivariantScoreModel.forward` and returns
    (1 + w)·good − w·weak in 1/Å, w per cell from its density (see the module docstring).
    Both models must share the cutoff (one neighbour graph)."""

    def __init__(self, good: nn.Module, weak: nn.Module, weight: float = 1.0,
                 from_g_cm3: float | None = None, to_g_cm3: float | None = None):
        super().__init__()
        if float(good.cutoff_A) != float(weak.cutoff_A):
            raise ValueError(f"autoguidance needs one cutoff for both models: "
                             f"{good.cutoff_A} Å against the weaker model's {weak.cutoff_A} Å")
        if weight < 0:
            raise ValueError(f"autoguidance weight must be ≥ 0, got {weight}")
        if (from_g_cm3 is None) != (to_g_cm3 is None) or (
                from_g_cm3 is not None and not from_g_cm3 < to_g_cm3):
            raise ValueError(f"the autoguidance density ramp needs both from_g_cm3 < to_g_cm3, "
                             f"or neither (got {from_g_cm3}, {to_g_cm3})")
        self.good, self.weak, self.weight = good, weak, float(weight)
        self.from_g_cm3, self.to_g_cm3 = from_g_cm3, to_g_cm3
        self.cutoff_A = float(good.cutoff_A)
        self.register_buffer("masses_amu", torch.as_tensor(atomic_masses, dtype=torch.float32),
                             persistent=False)

    def weight_at(self, density_g_cm3: float | torch.Tensor) -> torch.Tensor:
        """w at mass densities (g/cm³), a tensor of their shape."""
        rho = (density_g_cm3 if torch.is_tensor(density_g_cm3)
               else torch.tensor(float(density_g_cm3), dtype=torch.float64))
        if self.from_g_cm3 is None:
            return torch.full_like(rho, self.weight)
        share = (rho - self.from_g_cm3) / (self.to_g_cm3 - self.from_g_cm3)
        return self.weight * share.clamp(0.0, 1.0)

    def cell_weights(self, numbers: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor
                     ) -> torch.Tensor:
        """w of each cell (B,), from its mass density (g/cm³)."""
        cell = cell.reshape(-1, 3, 3)
        masses = self.masses_amu.to(cell.dtype)[numbers.clamp(0, self.masses_amu.numel() - 1)]
        return self.weight_at(DensityEmbedding.cell_density_g_cm3(masses, cell, batch))

    def kept_mb(self, n_edges: int, device=None) -> float:
        """Memory (MB) both models keep for a differentiated call over `n_edges` edges."""
        return self.good.kept_mb(n_edges, device) + self.weak.kept_mb(n_edges, device)

    def forward(self, pos, cell, numbers, sigma, edge_index, edge_shift, batch=None
                ) -> torch.Tensor:
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        good = self.good(pos, cell, numbers, sigma, edge_index, edge_shift, batch)
        weight = self.cell_weights(numbers, cell.to(pos.dtype), batch)
        if not bool((weight > 0).any()):
            return good
        weak = self.weak(pos, cell, numbers, sigma, edge_index, edge_shift, batch)
        return good + weight[batch].unsqueeze(-1) * (good - weak)


def autoguidance_weight(score_model: nn.Module, density_g_cm3: float) -> float | None:
    """The autoguidance weight a prior's score model uses at `density_g_cm3` (g/cm³), for
    reports; None when the model is not autoguided."""
    if isinstance(score_model, AutoguidedScoreModel):
        return float(score_model.weight_at(density_g_cm3))
    return None
