"""Spectrum heads: per-atom features (N, F) → non-negative per-site spectra (K, N, M).

`EnsembleHead` holds K independent MLPs evaluated in one batched matmul; their spread is the
surrogate's uncertainty. Feature standardisation and the target scale live in buffers, so a
head is self-contained once fitted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EnsembleLinear(nn.Module):
    """K independent affine maps: (K, B, in) → (K, B, out); an input (B, in) is shared by all K."""

    def __init__(self, n_members: int, in_dim: int, out_dim: int, seeds: list[int]):
        super().__init__()
        weight = torch.empty(n_members, in_dim, out_dim)
        bias = torch.empty(n_members, out_dim)
        bound = 1.0 / math.sqrt(in_dim)
        for k, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(int(seed))
            weight[k].uniform_(-bound, bound, generator=gen)
            bias[k].uniform_(-bound, bound, generator=gen)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return torch.einsum("bi,kio->kbo", x, self.weight) + self.bias[:, None, :]
        return torch.baddbmm(self.bias[:, None, :], x, self.weight)


class EnsembleHead(nn.Module):
    """K MLPs (F → hidden … → M) with softplus output: non-negative per-site spectra.

    Args:
        in_dim: feature width F.
        n_energies: M, points of the energy grid.
        hidden: hidden widths.
        n_members: K (≥ 1); member k is initialised from seed ``seed + 1000 k``.
        dropout: dropout on hidden layers during training.
    Buffers: ``feature_mean``/``feature_std`` (F,) standardise inputs; ``target_scale`` (scalar)
    is the intensity unit the MLP works in (outputs are multiplied by it).
    """

    def __init__(self, in_dim: int, n_energies: int, hidden=(128, 128), n_members: int = 4,
                 seed: int = 0, dropout: float = 0.0):
        super().__init__()
        if n_members < 1:
            raise ValueError("an ensemble needs at least one member")
        self.in_dim, self.n_energies, self.n_members = int(in_dim), int(n_energies), int(n_members)
        self.hidden, self.seed, self.dropout = tuple(int(h) for h in hidden), int(seed), float(dropout)
        seeds = [self.seed + 1000 * k for k in range(n_members)]
        dims = [self.in_dim, *self.hidden, self.n_energies]
        self.layers = nn.ModuleList(
            EnsembleLinear(n_members, a, b, [s + 7 * i for s in seeds])
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])))
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))
        self.register_buffer("target_scale", torch.ones(()))

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "n_energies": self.n_energies, "hidden": list(self.hidden),
                "n_members": self.n_members, "seed": self.seed, "dropout": self.dropout}

    @torch.no_grad()
    def fit_normalisation(self, features: torch.Tensor, site_spectra: torch.Tensor) -> None:
        """Set the standardisation from training features (B, F) and spectra (B, M); initialise the
        output bias so every member starts at the mean training spectrum."""
        self.feature_mean.copy_(features.mean(0))
        std = features.std(0)
        # Constant features (e.g. the element embedding of a one-element system) carry nothing.
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.full_like(std, float("inf"))))
        self.target_scale.copy_(site_spectra.std().clamp(min=1e-8))
        mean = (site_spectra.mean(0) / self.target_scale).clamp(min=1e-4)
        inv_softplus = mean + torch.log(-torch.expm1(-mean))
        self.layers[-1].bias.copy_(inv_softplus.expand_as(self.layers[-1].bias))
        self.layers[-1].weight.mul_(0.1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) features → (K, N, M) non-negative spectra (intensity units of the training data)."""
        x = (features - self.feature_mean) / self.feature_std
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.silu(x)
                if self.dropout > 0:
                    x = F.dropout(x, self.dropout, self.training)
        return F.softplus(x) * self.target_scale
