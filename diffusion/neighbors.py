"""A Verlet-skin neighbour-list cache: the periodic graph is rebuilt only when needed.

Edges are built with cutoff + skin; they stay valid (contain every pair within the cutoff) until
some atom has moved more than skin/2 since the last build. The score model drops the extra edges
beyond its cutoff, so results equal those of a fresh graph. Works on a batch of cells.

Samplers wrap positions back into the cell after every step, so an atom that crosses a cell face
jumps by a lattice vector without moving. Its edges keep their meaning only if their image shifts
follow the jump: `get` adds each atom's whole-cell jumps since the build to the shifts of its
edges (without this, such an atom lost every neighbour across that face until the next rebuild).
"""

from __future__ import annotations

import numpy as np
import torch

from xanesdiff.datasets.graph import fractional, fractional_to_cartesian, periodic_neighbor_list


class NeighborListCache:
    def __init__(self, cutoff_A: float, skin_A: float = 1.0):
        self.cutoff_A, self.skin_A = float(cutoff_A), float(skin_A)
        self.n_builds = 0
        self.clear()

    def clear(self):
        self._pos = self._cell = self._batch = self._edges = None

    def _lattice_jumps(self, pos, cell, batch) -> torch.Tensor | None:
        """Whole-cell translations (N,3), in cell vectors, of each atom since the last build, or
        None when the edges must be rebuilt (other cells, or an atom moved more than skin/2)."""
        if (self._pos is None or self._pos.shape != pos.shape or self._cell.shape != cell.shape
                or self._pos.device != pos.device):
            return None
        if not torch.equal(self._cell, cell) or not torch.equal(self._batch, batch):
            return None
        frac = fractional(pos - self._pos, cell, batch)
        jumps = torch.round(frac)
        moved = fractional_to_cartesian(frac - jumps, cell, batch).norm(dim=-1).max()
        return jumps if bool(moved <= 0.5 * self.skin_A) else None

    def get(self, pos_A: torch.Tensor, cell_A: torch.Tensor, batch: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(edge_index (2,E), edge_shift (E,3)) valid for `pos_A` in cells `cell_A` (B,3,3)."""
        pos = pos_A.detach()
        cell = cell_A.detach().reshape(-1, 3, 3)
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        jumps = self._lattice_jumps(pos, cell, batch)
        if jumps is None:
            self._build(pos, cell, batch)
            return self._edges
        edge_index, edge_shift = self._edges
        if bool(jumps.any()):  # r_i → r_i + n_i·cell: shift S_ij → S_ij + n_i − n_j
            src, dst = edge_index
            edge_shift = edge_shift + (jumps[src] - jumps[dst]).to(edge_shift.dtype)
        return edge_index, edge_shift

    def _build(self, pos, cell, batch):
        counts = torch.bincount(batch, minlength=cell.shape[0])
        starts = (counts.cumsum(0) - counts).tolist()
        pos_np, cell_np = pos.double().cpu().numpy(), cell.double().cpu().numpy()
        batch_np = batch.cpu().numpy()
        edges, shifts = [], []
        for g in range(cell.shape[0]):
            # atoms of one cell are contiguous (as in a PyG batch); the loop is over cells only
            members = slice(starts[g], starts[g] + int(counts[g]))
            assert (batch_np[members] == g).all(), "atoms of one cell must be contiguous"
            i, j, s, _ = periodic_neighbor_list(pos_np[members], cell_np[g],
                                                self.cutoff_A + self.skin_A)
            edges.append(np.stack([i, j]) + starts[g])
            shifts.append(s)
        edge_index = torch.from_numpy(np.concatenate(edges, axis=1)).to(pos.device)
        edge_shift = torch.from_numpy(np.concatenate(shifts, axis=0)).to(pos.device, pos.dtype)
        self._pos, self._cell, self._batch = pos.clone(), cell.clone(), batch.clone()
        self._edges = (edge_index, edge_shift)
        self.n_builds += 1
