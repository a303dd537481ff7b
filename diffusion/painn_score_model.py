"""A cheaper score model: PaiNN-style message passing on scalar and vector channels.

Same interface and inputs as `EquivariantScoreModel` (species, noise level σ, optionally the
cell's mass density; edge vectors with periodic image shifts), but the atoms carry F scalars and
F vectors instead of e3nn irreps, and messages are products of dense layers with the edge's unit
vector rather than Clebsch–Gordan tensor products: several times cheaper per score call on a CPU.
Output: one vector per atom, a σ-free mix of its vector channels whose weights its scalars set,
divided by σ (score in 1/Å). Optionally (`angular_lmax`), each atom's first scalars also get
the power spectrum of its neighbour directions (`AngularInvariants`), which tells tetrahedral
from planar order. Equivariant by construction, invariant to translations, images and atom
order.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from xanesdiff.diffusion.score_model import (BesselBasis, DensityEmbedding, NoiseEmbedding,
                                             RecomputesMessages, edges_within_cutoff)
from xanesdiff.forward.gnn_scratch import PaiNNMessage, PaiNNUpdate

KEPT_MB_PER_EDGE = 0.0098
"""Memory autograd keeps per edge for a differentiated score call (MB, float32, width 64,
3 layers; measured at 3000 atoms, 22 edges per atom: each layer keeps ≈850 floats per edge —
the gathered neighbour parts, their filters and the vector products; the shipped prior's
bond-order invariants add ≈0.0012)."""
KEPT_MB_PER_EDGE_RECOMPUTED = 0.0009
"""The same with the messages recomputed in the backward pass, block by block (measured at
3000 atoms, ≈11× less)."""


class AngularInvariants(nn.Module):
    """Rotation-invariant bond-order features of each atom's neighbourhood (a power spectrum):
    q_lmn = Σ_j Y_lm(r̂_ij)·R_n(r_ij), p_ln = Σ_m q_lmn² for l = 0…lmax and each radial channel
    n. l = 2 tells planar (sp2) from other neighbourhoods, l = 3 tetrahedral (sp3) ones: order
    that vector (l = 1) channels see only indirectly. Input: unit vectors (E,3), radial
    features (E, n_radial) already cut off smoothly, the edges' centre atoms (E,); output
    (N, (lmax+1)·n_radial)."""

    def __init__(self, lmax: int, n_radial: int):
        super().__init__()
        self.irreps = o3.Irreps.spherical_harmonics(lmax)
        self.lmax, self.n_radial = int(lmax), int(n_radial)
        self.register_buffer("degree", torch.cat([torch.full((2 * l + 1,), l)
                                                  for l in range(lmax + 1)]), persistent=False)

    @property
    def n_features(self) -> int:
        return (self.lmax + 1) * self.n_radial

    def forward(self, unit, radial, centre, n_atoms: int):
        harmonics = o3.spherical_harmonics(self.irreps, unit, normalize=False,
                                           normalization="component")
        terms = (harmonics.unsqueeze(2) * radial.unsqueeze(1)).flatten(1)  # (E, M·n_radial)
        q = terms.new_zeros(n_atoms, terms.shape[1]).index_add(0, centre, terms)
        q = q.view(n_atoms, -1, self.n_radial).square()
        power = q.new_zeros(n_atoms, self.lmax + 1, self.n_radial).index_add(
            1, self.degree, q)
        return power.flatten(1)


class PaiNNScoreModel(RecomputesMessages, nn.Module):
    """Score network s_θ(x, σ) for atoms in periodic cells, PaiNN layers.

    `forward(pos (N,3) Å, cell (B,3,3) Å, numbers (N,), sigma (N,) Å or scalar, edge_index (2,E),
    edge_shift (E,3), batch (N,)) -> (N,3)` score in 1/Å. Constructor arguments are what a
    checkpoint stores (`config()`).
    """

    def __init__(self, cutoff_A: float = 3.5, width: int = 64, n_layers: int = 3,
                 n_species: int = 100, n_basis: int = 8, n_noise_features: int = 16,
                 avg_neighbors: float = 20.0, n_density_features: int = 0,
                 angular_lmax: int = 0):
        super().__init__()
        self._config = dict(cutoff_A=cutoff_A, width=width, n_layers=n_layers,
                            n_species=n_species, n_basis=n_basis,
                            n_noise_features=n_noise_features, avg_neighbors=avg_neighbors,
                            n_density_features=n_density_features, angular_lmax=angular_lmax)
        self.cutoff_A = float(cutoff_A)
        self.width = int(width)
        # messages are summed over ≈avg_neighbors edges: scaled by 1/√avg_neighbors, so the
        # features keep their size from layer to layer (unscaled, training diverged)
        self.message_scale = 1.0 / math.sqrt(avg_neighbors)
        self.species_embedding = nn.Embedding(n_species + 1, width)
        self.noise_embedding = NoiseEmbedding(n_noise_features)
        self.noise_mlp = nn.Sequential(nn.Linear(n_noise_features, width), nn.SiLU(),
                                       nn.Linear(width, width))
        self.density_embedding = (DensityEmbedding(n_density_features, width)
                                  if n_density_features else None)
        self.basis = BesselBasis(cutoff_A, n_basis)
        # angular_lmax > 0: bond-order invariants up to that l join the atoms' first scalars
        self.angular = AngularInvariants(angular_lmax, n_basis) if angular_lmax else None
        self.angular_mlp = (nn.Sequential(nn.Linear(self.angular.n_features, width), nn.SiLU(),
                                          nn.Linear(width, width)) if angular_lmax else None)
        n_edge = n_basis + n_noise_features
        self.messages = nn.ModuleList(PaiNNMessage(width, n_edge) for _ in range(n_layers))
        self.updates = nn.ModuleList(PaiNNUpdate(width) for _ in range(n_layers))
        self.readout_weights = nn.Sequential(nn.Linear(width, width), nn.SiLU(),
                                             nn.Linear(width, width))

    def config(self) -> dict:
        return dict(self._config)

    def kept_mb_per_edge(self, recomputed: bool) -> float:
        per_edge = KEPT_MB_PER_EDGE_RECOMPUTED if recomputed else KEPT_MB_PER_EDGE
        return per_edge * len(self.messages) / 3 * self.width / 64

    def forward(self, pos, cell, numbers, sigma, edge_index, edge_shift, batch=None):
        n = pos.shape[0]
        sigma_atom, batch, vec, length, edge_index = edges_within_cutoff(
            pos, cell, sigma, edge_index, edge_shift, batch, self.cutoff_A)
        unit = vec / length.clamp_min(1e-6).unsqueeze(-1)
        noise_feat = self.noise_embedding(sigma_atom)
        radial = self.basis(length)
        edge_features = torch.cat([radial, noise_feat[edge_index[0]]], dim=-1)
        envelope = self.basis.envelope(length) * self.message_scale
        s = self.species_embedding(numbers.clamp(0, self.species_embedding.num_embeddings - 1))
        s = s + self.noise_mlp(noise_feat)
        if self.angular is not None:
            radial_cut = radial * envelope.unsqueeze(1)
            s = s + self.angular_mlp(self.angular(unit, radial_cut, edge_index[0], n))
        if self.density_embedding is not None:
            s = s + self.density_embedding(numbers, cell.to(pos.dtype), batch)
        v = None  # zero vectors: the first layer's messages skip them
        src, dst = edge_index
        recompute = torch.is_grad_enabled() and self.recomputes(src.numel(), pos.device)
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, src, dst, unit, edge_features, envelope, recompute)
            s, v = update(s, v)
        out = (v * self.readout_weights(s).unsqueeze(1)).sum(-1)
        return out / sigma_atom.unsqueeze(-1)
