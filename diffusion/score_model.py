"""E(3)-equivariant score model on the periodic radius graph (e3nn, NequIP-style convolutions).

Node input: a species embedding (any element, multi-element ready) plus an embedding of the noise
level σ and, optionally, of the cell's mass density (g/cm³, from the cell volume and the atoms'
masses: one number per cell, so the cost per atom stays the same in cells of any size). Each
interaction layer: spherical harmonics of the edge direction, a radial basis
(Bessel × smooth cutoff envelope) concatenated with the σ embedding, an MLP giving per-edge
tensor-product weights, a channel-wise ('uvu') tensor product, a sum over neighbours, a linear
mix, a gated nonlinearity and a residual. Output: one vector (1o) per atom, the score times σ
(dimensionless, ≈ −ε), so `score = output / σ`. Equivariant by construction; only edge vectors
(with periodic image shifts) enter, so the model is translation- and image-invariant.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn

from xanesdiff.datasets.graph import add_rows, edge_vectors
from xanesdiff.numerics import gaussians
from xanesdiff.runtime import device_memory_mb

KEPT_MB_PER_EDGE = 0.014
"""Memory autograd keeps per edge for a differentiated score call (MB, float32; default prior
with frozen weights, as loaded for sampling, a-C at 2.5 g/cm³, ≈22 edges per atom: 0.0127
measured at 3000 atoms; trainable weights keep 0.015)."""
KEPT_MB_PER_EDGE_RECOMPUTED = 0.0008
"""The same with the messages recomputed in the backward pass (0.0007 measured, ≈19× less;
trainable weights 0.0013)."""
RECOMPUTE_MEMORY_FRACTION = 0.35
"""Recompute the messages when those kept would take more than this share of the device's
memory (a 3·10⁴-atom cell on a 23 GB machine does, a 10⁴-atom cell does not; the guidance
surrogate needs its own share of the same step)."""


class RecomputesMessages:
    """Mixin of score models whose differentiated pass can recompute its messages in the
    backward pass instead of keeping them: subclasses give `kept_mb_per_edge(recomputed)`."""

    recompute_min_edges: int | None = None  # None: decided by memory (`recomputes`)

    def kept_mb_per_edge(self, recomputed: bool) -> float:
        raise NotImplementedError

    def recomputes(self, n_edges: int, device=None) -> bool:
        """Whether a differentiated pass over `n_edges` edges recomputes its messages in the
        backward pass: from `recompute_min_edges` edges if set, else when the messages kept
        for it would take more than `RECOMPUTE_MEMORY_FRACTION` of the device's memory."""
        if self.recompute_min_edges is not None:
            return n_edges >= self.recompute_min_edges
        total_mb = device_memory_mb(device)
        return total_mb is not None and n_edges * self.kept_mb_per_edge(False) > (
            RECOMPUTE_MEMORY_FRACTION * total_mb)

    def kept_mb(self, n_edges: int, device=None) -> float:
        """Memory (MB) autograd keeps for a differentiated call over `n_edges` edges."""
        return n_edges * self.kept_mb_per_edge(self.recomputes(n_edges, device))


def edges_within_cutoff(pos, cell, sigma, edge_index, edge_shift, batch, cutoff_A: float):
    """What every score model reads first: per-atom σ (N,) Å, the cell index of each atom (N,),
    and the edges shorter than `cutoff_A` (a graph built with a Verlet skin has longer ones):
    their vectors (E,3) Å, lengths (E,) Å and indices (2,E)."""
    n = pos.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    sigma = torch.as_tensor(sigma, dtype=pos.dtype, device=pos.device)
    sigma_atom = sigma.expand(n) if sigma.ndim == 0 else sigma.reshape(n)
    vec = edge_vectors(pos, cell.to(pos.dtype), edge_index, edge_shift.to(pos.dtype), batch)
    length = vec.norm(dim=-1)
    keep = length < cutoff_A
    if not bool(keep.all()):
        vec, length, edge_index = vec[keep], length[keep], edge_index[:, keep]
    return sigma_atom, batch, vec, length, edge_index


class BesselBasis(nn.Module):
    """sin(nπr/c)/r radial basis times a smooth polynomial envelope that vanishes at r = c."""

    def __init__(self, cutoff_A: float, n_basis: int = 8, envelope_p: int = 6):
        super().__init__()
        self.cutoff_A = float(cutoff_A)
        self.register_buffer("freqs", torch.arange(1, n_basis + 1) * math.pi / self.cutoff_A)
        self.p = envelope_p

    def envelope(self, r_A: torch.Tensor) -> torch.Tensor:
        """Smooth cutoff (1 at r = 0, 0 with vanishing derivatives at and beyond the cutoff)."""
        x = (r_A / self.cutoff_A).clamp(0, 1)
        p = self.p
        env = (1 - (p + 1) * (p + 2) / 2 * x ** p + p * (p + 2) * x ** (p + 1)
               - p * (p + 1) / 2 * x ** (p + 2))
        return env * (x < 1)

    def forward(self, r_A: torch.Tensor) -> torch.Tensor:
        r = r_A.unsqueeze(-1).clamp_min(1e-6)
        return (math.sqrt(2 / self.cutoff_A) * torch.sin(self.freqs * r) / r
                * self.envelope(r_A).unsqueeze(-1))


class NoiseEmbedding(nn.Module):
    """Gaussian features of log σ on a fixed grid (σ from 1e-3 to 3 Å)."""

    def __init__(self, n_features: int = 16, log_sigma_min: float = math.log(1e-3),
                 log_sigma_max: float = math.log(3.0)):
        super().__init__()
        self.register_buffer("centers", torch.linspace(log_sigma_min, log_sigma_max, n_features))
        self.width = (log_sigma_max - log_sigma_min) / (n_features - 1)

    def forward(self, sigma_A: torch.Tensor) -> torch.Tensor:
        return gaussians(torch.log(sigma_A.clamp_min(1e-6)), self.centers, self.width)


class DensityEmbedding(nn.Module):
    """Per-atom features of its cell's mass density (g/cm³): Gaussians on a grid, then a small MLP
    whose last layer starts at zero, so adding it to a trained model leaves the model unchanged."""

    def __init__(self, n_features: int, n_out: int, density_min: float = 1.0,
                 density_max: float = 4.0):
        super().__init__()
        from ase.data import atomic_masses

        self.register_buffer("centers", torch.linspace(density_min, density_max, n_features))
        self.width = (density_max - density_min) / (n_features - 1)
        self.register_buffer("masses_amu", torch.as_tensor(atomic_masses, dtype=torch.float32),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(n_features, n_out), nn.SiLU(), nn.Linear(n_out, n_out))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @staticmethod
    def cell_density_g_cm3(masses_amu, cell, batch):
        """Mass density (B,) in g/cm³ of each cell: masses (N,) amu, cell (B,3,3) Å, batch (N,)."""
        total = masses_amu.new_zeros(cell.shape[0]).index_add(0, batch, masses_amu)
        return total / torch.linalg.det(cell).abs() * 1.66053906660  # amu/Å³ -> g/cm³

    def forward(self, numbers, cell, batch):
        masses = self.masses_amu.to(cell.dtype)[numbers.clamp(0, self.masses_amu.numel() - 1)]
        rho = self.cell_density_g_cm3(masses, cell, batch)[batch]
        return self.mlp(gaussians(rho, self.centers, self.width))


class Interaction(nn.Module):
    """One equivariant convolution + gate + residual: irreps_in -> irreps_out."""

    def __init__(self, irreps_in: str, irreps_out: str, irreps_sh: str, n_edge_features: int,
                 radial_hidden: int, avg_neighbors: float, used_irreps: str | None = None):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        irreps_sh = o3.Irreps(irreps_sh)
        scalars = o3.Irreps([(m, ir) for m, ir in self.irreps_out if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in self.irreps_out if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
        self.gate = Gate(scalars, [torch.nn.functional.silu] * len(scalars),
                         gates, [torch.sigmoid] * len(gates), gated)
        # channel-wise tensor product: every (input irrep) x (harmonic) path that lands in an
        # irrep type the layer can use.
        wanted = {ir for _, ir in self.gate.irreps_in}
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in wanted:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        self.tp = o3.TensorProduct(self.irreps_in, irreps_sh, o3.Irreps(mid), instructions,
                                   shared_weights=False, internal_weights=False)
        self.radial = FullyConnectedNet([n_edge_features, radial_hidden, radial_hidden,
                                         self.tp.weight_numel], torch.nn.functional.silu)
        self.linear_msg = o3.Linear(self.tp.irreps_out.simplify(), self.gate.irreps_in)
        self.self_connection = o3.Linear(self.irreps_in, self.gate.irreps_in)
        self.residual = self.irreps_in == self.irreps_out
        self.norm = 1.0 / math.sqrt(avg_neighbors)
        self._prune_messages(used_irreps)

    def _prune_messages(self, used_irreps: str | None):
        """Compute only the messages that can reach the outputs someone reads.

        `used_irreps` (e.g. "1o" in the last layer, whose readout reads vectors only): the irrep
        types of this layer's output that are used. The linear mix and the gate keep irrep
        types apart, so only tensor-product paths landing in a used type, or in 0e when a used
        type is gated, matter; the other paths are skipped (their output slots stay zero, so the
        unused outputs are wrong and the used ones exact). The parameters stay as they are, so a
        checkpoint loads either way. None: every path (all outputs exact)."""
        self.skip_unused_paths = False  # True once there are paths to skip
        # Held outside the module tree (`_apply` moves it): its constants derive from the
        # irreps and belong in no checkpoint, which a registered copy (in an EMA deep copy, say)
        # would put there.
        self.__dict__["tp_used"] = None
        if used_irreps is None:
            return
        used = {ir for _, ir in o3.Irreps(used_irreps)}
        needed = set(used)
        if any(ir.l > 0 for ir in used):
            needed.add(o3.Irrep("0e"))  # the gates
        kept = [k for k, ins in enumerate(self.tp.instructions)
                if self.tp.irreps_out[ins.i_out].ir in needed]
        if len(kept) == len(self.tp.instructions):
            return
        weight_slices, out_slices = [], self.tp.irreps_out.slices()
        offset = 0
        for ins in self.tp.instructions:
            size = math.prod(ins.path_shape)
            weight_slices.append(torch.arange(offset, offset + size))
            offset += size
        instructions = [(ins.i_in1, ins.i_in2, n, ins.connection_mode, ins.has_weight)
                        for n, ins in enumerate(self.tp.instructions[k] for k in kept)]
        mid = [self.tp.irreps_out[self.tp.instructions[k].i_out] for k in kept]
        self.__dict__["tp_used"] = o3.TensorProduct(
            self.tp.irreps_in1, self.tp.irreps_in2, o3.Irreps(mid), instructions,
            shared_weights=False, internal_weights=False)
        self.skip_unused_paths = True
        self.register_buffer("used_weights", torch.cat([weight_slices[k] for k in kept]),
                             persistent=False)
        self.register_buffer("used_outputs", torch.cat(
            [torch.arange(self.tp.irreps_out.dim)[out_slices[self.tp.instructions[k].i_out]]
             for k in kept]), persistent=False)

    def start_as_identity(self) -> None:
        """Zero both output mixes: the gate then outputs zero and the residual passes the input
        through unchanged, so a layer inserted into a trained model leaves its scores as they
        were (and still learns: the mixes' gradients are not zero)."""
        if not self.residual:
            raise ValueError("only a residual layer (irreps_in == irreps_out) can start as the "
                             "identity")
        with torch.no_grad():
            self.linear_msg.weight.zero_()
            self.self_connection.weight.zero_()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.tp_used is not None:
            self.tp_used._apply(fn, *args, **kwargs)
        return self

    def _messages(self, h, neighbours, edge_sh, edge_features, edge_envelope):
        """Messages (E_block, tp out) of one block of edges from their `neighbours`' features."""
        weights = self.radial(edge_features) * edge_envelope.unsqueeze(-1)
        if self.skip_unused_paths:
            return self.tp_used(h[neighbours], edge_sh, weights[:, self.used_weights])
        return self.tp(h[neighbours], edge_sh, weights)

    # Edges are processed in blocks: memory stays bounded on large cells and each block's
    # working set stays cache-sized (10^4 atoms: 1.95 s -> 0.97 s per score call, 2 threads;
    # benchmarks/scale.json). A GPU has no such cache to fit and pays per kernel launch, so
    # there the blocks are 16× larger (memory still bounded by the block, not the cell).
    edge_block = 16384
    edge_block_gpu = 262144

    def forward(self, h, edge_sh, edge_features, edge_envelope, edge_index,
                recompute: bool = False):
        """`recompute`: keep no block's intermediates for the backward pass but compute them
        again there (same values and gradients; memory of one block instead of every edge's)."""
        src, dst = edge_index  # edge i->j: message from neighbour j to centre i (src = i)
        skip = self.skip_unused_paths
        agg = h.new_zeros(h.shape[0], (self.tp_used if skip else self.tp).irreps_out.dim)
        size = self.edge_block if h.device.type == "cpu" else self.edge_block_gpu
        radial_weights = tuple(self.radial.parameters())  # what `_messages` reads besides inputs
        for start in range(0, src.numel(), size):
            block = slice(start, start + size)
            inputs = (h, dst[block], edge_sh[block], edge_features[block], edge_envelope[block])
            agg = add_rows(agg, src[block], self._messages, inputs, recompute,
                           params=radial_weights)
        agg = agg * self.norm
        if skip:  # back to the full layout, skipped paths at zero
            agg = agg.new_zeros(agg.shape[0], self.tp.irreps_out.dim).index_copy(
                1, self.used_outputs, agg)
        # tp.irreps_out is unsimplified; simplify() only merges neighbours of equal type, which
        # keeps the memory layout, so the tensor can be read with the simplified irreps.
        out = self.gate(self.linear_msg(agg) + self.self_connection(h))
        return h + out if self.residual else out


class EquivariantScoreModel(RecomputesMessages, nn.Module):
    """Score network s_θ(x, σ) for atoms in periodic cells.

    `forward(pos (N,3) Å, cell (B,3,3) Å, numbers (N,), sigma (N,) Å or scalar, edge_index (2,E),
    edge_shift (E,3), batch (N,)) -> (N,3)` score in 1/Å. Constructor arguments are what a
    checkpoint stores (`config()`). `n_density_features > 0` conditions on the cell's density.
    """

    def __init__(self, cutoff_A: float = 3.5, irreps_hidden: str = "32x0e + 16x1o + 8x1e",
                 n_layers: int = 3, lmax: int = 2, n_species: int = 100, n_basis: int = 8,
                 n_noise_features: int = 16, radial_hidden: int = 48,
                 avg_neighbors: float = 20.0, n_density_features: int = 0):
        super().__init__()
        self._config = dict(cutoff_A=cutoff_A, irreps_hidden=irreps_hidden, n_layers=n_layers,
                            lmax=lmax, n_species=n_species, n_basis=n_basis,
                            n_noise_features=n_noise_features, radial_hidden=radial_hidden,
                            avg_neighbors=avg_neighbors, n_density_features=n_density_features)
        self.cutoff_A = float(cutoff_A)
        hidden = o3.Irreps(irreps_hidden)
        n_scalars = sum(m for m, ir in hidden if ir == o3.Irrep("0e"))
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.species_embedding = nn.Embedding(n_species + 1, n_scalars)
        self.noise_embedding = NoiseEmbedding(n_noise_features)
        self.noise_mlp = FullyConnectedNet([n_noise_features, n_scalars, n_scalars],
                                           torch.nn.functional.silu)
        self.density_embedding = (DensityEmbedding(n_density_features, n_scalars)
                                  if n_density_features else None)
        self.basis = BesselBasis(cutoff_A, n_basis)
        n_edge = n_basis + n_noise_features
        layers = []
        irreps_in = f"{n_scalars}x0e"
        for k in range(n_layers):
            last = k == n_layers - 1  # the readout reads its vectors only
            layers.append(Interaction(irreps_in, str(hidden), str(self.irreps_sh), n_edge,
                                      radial_hidden, avg_neighbors,
                                      used_irreps="1o" if last else None))
            irreps_in = str(hidden)
        self.layers = nn.ModuleList(layers)
        self.readout = o3.Linear(hidden, "1x1o")

    def config(self) -> dict:
        return dict(self._config)

    def kept_mb_per_edge(self, recomputed: bool) -> float:
        return KEPT_MB_PER_EDGE_RECOMPUTED if recomputed else KEPT_MB_PER_EDGE

    def forward(self, pos, cell, numbers, sigma, edge_index, edge_shift, batch=None):
        sigma_atom, batch, vec, length, edge_index = edges_within_cutoff(
            pos, cell, sigma, edge_index, edge_shift, batch, self.cutoff_A)
        edge_sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True,
                                         normalization="component")
        noise_feat = self.noise_embedding(sigma_atom)
        edge_features = torch.cat([self.basis(length), noise_feat[edge_index[0]]], dim=-1)
        envelope = self.basis.envelope(length)
        h = self.species_embedding(numbers.clamp(0, self.species_embedding.num_embeddings - 1))
        h = h + self.noise_mlp(noise_feat)
        if self.density_embedding is not None:
            h = h + self.density_embedding(numbers, cell.to(pos.dtype), batch)
        recompute = torch.is_grad_enabled() and self.recomputes(edge_index.shape[1], pos.device)
        for layer in self.layers:
            h = layer(h, edge_sh, edge_features, envelope, edge_index, recompute)
        return self.readout(h) / sigma_atom.unsqueeze(-1)
