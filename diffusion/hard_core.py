"""The score of a hard core: no two atoms of the data are closer than `r_core_A`.

The learned score is trained on noised data, so for a pair closer than any pair of the data it
has seen nothing at small noise, and its value there is arbitrary: in guided cells of thousands
of atoms the shipped prior let about one pair in 10⁴ atoms collapse to 0.3–0.6 Å. The noised data
density is known there: if the clean pair distance is at least r_core, a noised pair at
r < r_core lies in the Gaussian tail of its relative displacement (variance 2σ² per coordinate),
so

    ∇ log p_σ ≈ −∇ Σ_pairs (r_core − r)² / (4σ²)      for r < r_core, and 0 otherwise.

`HardCoreScore` is that term, added to the learned score for noise levels σ ≤ `sigma_max_A`
(above, training showed the model plenty of close pairs). It is part of the prior's score during
sampling, not a clean-up of finished structures, and it never acts on a structure whose pairs are
all at least r_core apart.
"""

from __future__ import annotations

import torch

from xanesdiff.datasets.graph import edge_vectors


class HardCoreScore:
    """Score (N,3) in 1/Å of the hard-core constraint, from the prior's periodic graph.

    `r_core_A` (Å): below every pair of the data (the a-C frames' closest pair is 1.19 Å; 1.1 Å
    is also the closest pair the prior's targets allow). `sigma_max_A` (Å): the largest noise
    level at which the term is added.
    """

    def __init__(self, r_core_A: float = 1.1, sigma_max_A: float = 0.4):
        if r_core_A <= 0 or sigma_max_A <= 0:
            raise ValueError(f"need r_core_A > 0 and sigma_max_A > 0, got {r_core_A}, "
                             f"{sigma_max_A}")
        self.r_core_A, self.sigma_max_A = float(r_core_A), float(sigma_max_A)

    def energy(self, pos_A: torch.Tensor, cell_A: torch.Tensor, edge_index: torch.Tensor,
               edge_shift: torch.Tensor, batch: torch.Tensor | None, sigma_A: float
               ) -> torch.Tensor:
        """Σ over pairs closer than r_core of (r_core − r)²/(4σ²) (dimensionless); the edge list
        must hold every such pair in both directions, so each pair counts twice and is halved."""
        length = edge_vectors(pos_A, cell_A, edge_index, edge_shift, batch).norm(dim=-1)
        overlap = (self.r_core_A - length).clamp_min(0.0)
        return 0.5 * overlap.pow(2).sum() / (4.0 * sigma_A ** 2)

    def __call__(self, pos_A: torch.Tensor, cell_A: torch.Tensor, edge_index: torch.Tensor,
                 edge_shift: torch.Tensor, batch: torch.Tensor | None, sigma_A: float
                 ) -> torch.Tensor:
        """−∇ energy (N,3) in 1/Å: each atom of a close pair pushed away from the other by
        (r_core − r)/(2σ²); zero above `sigma_max_A` or without close pairs."""
        score = torch.zeros_like(pos_A)
        if not 0 < sigma_A <= self.sigma_max_A:
            return score
        vec = edge_vectors(pos_A, cell_A, edge_index, edge_shift, batch)  # from i to j
        length = vec.norm(dim=-1)
        close = length < self.r_core_A
        if not bool(close.any()):
            return score
        vec, length, centre = vec[close], length[close], edge_index[0, close]
        push = (self.r_core_A - length) / (2.0 * sigma_A ** 2 * length.clamp_min(1e-6))
        return score.index_add(0, centre, -push.unsqueeze(-1) * vec)
