"""Baseline featuriser: smooth radial + angular histograms per atom (no learned parameters).

Radial: Gaussian-broadened neighbour counts at `n_radial` distances in [r_min_A, cutoff_A], each
neighbour weighted by a switch (1 up to cutoff − `taper_A`, cosine to 0 at the cutoff).
Angular: for every shell cutoff in `angular_cutoffs_A`, Gaussian-broadened bond angles θ_jik
(radians) of neighbour pairs, weighted by both bonds' switches. Everything is a smooth function of positions and cell (differentiable).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import nn

from xanesdiff.datasets.graph import add_rows, periodic_neighbor_list
from xanesdiff.numerics import gaussians


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """0.5 (cos(π r / rc) + 1) inside rc, 0 outside: smooth to first order at rc."""
    return torch.where(r < cutoff, 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0), torch.zeros_like(r))


def switch_cutoff(r: torch.Tensor, r_on: float, r_off: float) -> torch.Tensor:
    """1 below r_on, cosine taper to 0 at r_off, 0 beyond (smooth to first order)."""
    x = ((r - r_on) / (r_off - r_on)).clamp(0.0, 1.0)
    return 0.5 * (torch.cos(math.pi * x) + 1.0)


def neighbour_pairs(src: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (a, b), a ≠ b, of edges sharing a source atom (edges sorted by source)."""
    counts = torch.bincount(src, minlength=n_atoms)
    first = torch.cumsum(counts, 0) - counts
    reps = counts[src]
    a = torch.repeat_interleave(torch.arange(len(src), device=src.device), reps)
    starts = torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
    b = first[src[a]] + (torch.arange(len(a), device=src.device) - starts)
    keep = a != b
    return a[keep], b[keep]


ROWS_PER_BLOCK = 2 ** 16
"""Edges (or bond pairs) whose histogram terms are computed at once. A differentiated pass over
more than one block recomputes each block's terms in the backward pass, so it keeps the
blocks' inputs rather than their (rows × bins) terms."""


def summed_in_blocks(terms, total: torch.Tensor, index: torch.Tensor,
                     rows: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...] = ()
                     ) -> torch.Tensor:
    """`total` (n_rows, width) plus, for each k, terms(*(r[k] for r in rows), *inputs) added
    into row index[k].

    `rows`: tensors of `index`'s length (per-edge values, or a bond pair's two bonds), cut into
    blocks; `inputs`: the tensors `terms` reads at them, passed whole."""
    recompute = torch.is_grad_enabled() and len(index) > ROWS_PER_BLOCK
    for start in range(0, len(index), ROWS_PER_BLOCK):
        block = slice(start, start + ROWS_PER_BLOCK)
        args = (*(row[block] for row in rows), *inputs)
        total = add_rows(total, index[block], terms, args, recompute)
    return total


class RadialAngularDescriptor(nn.Module):
    """Per-atom radial + angular histogram features (N, n_radial + n_angular · len(shells))."""

    def __init__(self, cutoff_A: float = 5.0, r_min_A: float = 0.9, n_radial: int = 42,
                 radial_width_A: float = 0.1, angular_cutoffs_A=(1.95, 2.9), n_angular: int = 24,
                 angular_width_rad: float = 0.12, taper_A: float = 0.2):
        super().__init__()
        self.cutoff_A, self.r_min_A, self.n_radial = float(cutoff_A), float(r_min_A), int(n_radial)
        self.radial_width_A = float(radial_width_A)
        self.angular_cutoffs_A = tuple(float(c) for c in angular_cutoffs_A)
        self.n_angular, self.angular_width_rad = int(n_angular), float(angular_width_rad)
        self.taper_A = float(taper_A)
        self.register_buffer("radial_centres_A", torch.linspace(r_min_A, cutoff_A, n_radial),
                             persistent=False)
        self.register_buffer("angular_centres_rad", torch.linspace(0.0, math.pi, n_angular),
                             persistent=False)

    def config(self) -> dict:
        return {"type": "descriptor", "cutoff_A": self.cutoff_A, "r_min_A": self.r_min_A,
                "n_radial": self.n_radial, "radial_width_A": self.radial_width_A,
                "angular_cutoffs_A": list(self.angular_cutoffs_A), "n_angular": self.n_angular,
                "angular_width_rad": self.angular_width_rad, "taper_A": self.taper_A}

    @property
    def feature_dim(self) -> int:
        return self.n_radial + self.n_angular * len(self.angular_cutoffs_A)

    @property
    def cache_id(self) -> str:
        return "descriptor|" + repr(sorted(self.config().items()))

    def forward(self, pos: torch.Tensor, cell: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """(N, F) features; pos (N,3) Å, cell (3,3) Å (numbers unused: one-element descriptor)."""
        n = pos.shape[0]
        i, j, shifts, _ = periodic_neighbor_list(pos.detach().cpu().double().numpy(),
                                                 cell.detach().cpu().double().numpy(), self.cutoff_A)
        src, dst = torch.from_numpy(i).to(pos.device), torch.from_numpy(j).to(pos.device)
        # index_select, not pos[dst]: its backward is an index_add, where x[index]'s is an
        # accumulating index_put, several times slower (and sorted, in deterministic mode)
        vec = (pos.index_select(0, dst) + torch.from_numpy(shifts).to(pos) @ cell.reshape(3, 3)
               - pos.index_select(0, src))
        r = vec.norm(dim=1)
        parts = [summed_in_blocks(self._radial_terms, pos.new_zeros(n, self.n_radial), src, (r,))]
        for rc in self.angular_cutoffs_A:
            inside = torch.nonzero(r < rc).squeeze(1)
            s_src = src[inside]
            s_vec, s_r = vec.index_select(0, inside), r.index_select(0, inside)
            a, b = neighbour_pairs(s_src, n)
            parts.append(summed_in_blocks(partial(self._angular_terms, rc),
                                          pos.new_zeros(n, self.n_angular), s_src[a], (a, b),
                                          (s_vec, s_r)))
        return torch.cat(parts, dim=1)

    def _radial_terms(self, r: torch.Tensor) -> torch.Tensor:
        """(E_block, n_radial) switched Gaussians of the edges' lengths r (Å)."""
        centres = self.radial_centres_A.to(r.dtype)
        switch = switch_cutoff(r, self.cutoff_A - self.taper_A, self.cutoff_A)
        return gaussians(r, centres, self.radial_width_A) * switch[:, None]

    def _angular_terms(self, rc: float, a: torch.Tensor, b: torch.Tensor, vec: torch.Tensor,
                       r: torch.Tensor) -> torch.Tensor:
        """(P_block, n_angular) Gaussians of the angles between bonds a and b inside `rc` Å,
        weighted by both bonds' switches."""
        r_a, r_b = r.index_select(0, a), r.index_select(0, b)
        cos = (vec.index_select(0, a) * vec.index_select(0, b)).sum(1) / (r_a * r_b)
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        r_on = rc - self.taper_A
        weight = switch_cutoff(r_a, r_on, rc) * switch_cutoff(r_b, r_on, rc)
        centres = self.angular_centres_rad.to(r.dtype)
        return gaussians(theta, centres, self.angular_width_rad) * weight[:, None]

    @torch.no_grad()
    def features_of_atoms(self, atoms) -> torch.Tensor:
        return self(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
                    torch.tensor(atoms.numbers)).float()
