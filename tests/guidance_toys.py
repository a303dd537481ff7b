"""Small stand-ins for the trained models, so guidance tests run in seconds: a differentiable toy
surrogate (spectra from smooth coordination numbers) and a tiny random-weight prior."""

from __future__ import annotations

import numpy as np
import torch

from xanesdiff.datasets.energy_grid import EnergyGrid
from xanesdiff.datasets.graph import edge_vectors, periodic_neighbor_list

TOY_GRID = EnergyGrid(275.08, 0.38235, 100)


class ToySurrogate:
    """Per-site spectrum = a π* peak weighted by (4 − CN) plus a σ* peak weighted by CN, with a
    smooth coordination number CN_i = Σ_j sigmoid((1.85 Å − r_ij) / 0.1 Å). Two 'members'
    differ by a 3% scale, so the ensemble has a spread."""

    absorber = "C"
    grid = TOY_GRID

    def _cn(self, pos, cell):
        i, j, s, _ = periodic_neighbor_list(pos.detach().double().numpy(),
                                            cell.detach().double().numpy().reshape(3, 3), 2.6)
        vec = edge_vectors(pos, cell.to(pos.dtype), torch.from_numpy(np.stack([i, j])),
                           torch.from_numpy(s).to(pos.dtype))
        weight = torch.sigmoid((1.85 - vec.norm(dim=1)) / 0.1)
        return torch.zeros(pos.shape[0], dtype=pos.dtype).index_add(0, torch.from_numpy(i), weight)

    def site_spectra(self, pos, cell, numbers):
        energies = torch.as_tensor(self.grid.energies_eV, dtype=pos.dtype)
        pi = torch.exp(-0.5 * ((energies - 285.4) / 0.8) ** 2)
        sigma = torch.exp(-0.5 * ((energies - 292.0) / 3.0) ** 2)
        cn = self._cn(pos, cell)[:, None]
        site = (4.0 - cn).clamp_min(0) * pi + cn * sigma * 0.5
        return torch.stack([site, 1.03 * site])

    def mean_spectrum(self, pos, cell, numbers, site_mask=None):
        sites = self.site_spectra(pos, cell, numbers)
        if site_mask is not None:
            sites = sites[:, torch.as_tensor(site_mask)]
        return sites.mean(1)


def tiny_prior(seed: int = 0, dtype=torch.float64):
    from xanesdiff.diffusion.prior import DiffusionPrior
    from xanesdiff.diffusion.schedule import VESchedule
    from xanesdiff.diffusion.score_model import EquivariantScoreModel

    torch.manual_seed(seed)
    model = EquivariantScoreModel(cutoff_A=3.0, irreps_hidden="8x0e + 4x1o", n_layers=1, lmax=1,
                                  n_basis=4, n_noise_features=8, radial_hidden=8,
                                  avg_neighbors=15.0).to(dtype)
    return DiffusionPrior(model, VESchedule(0.8), skin_A=0.5)


def random_carbon(n: int = 24, density_g_cm3: float = 2.5, seed: int = 0):
    from xanesdiff.diffusion.sampling import cubic_cell_for_density

    rng = np.random.default_rng(seed)
    cell = cubic_cell_for_density(n, density_g_cm3)
    return (torch.tensor(rng.uniform(0, 1, (n, 3)) @ cell), torch.tensor(cell),
            torch.full((n,), 6, dtype=torch.long))
