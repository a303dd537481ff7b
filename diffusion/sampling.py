"""Unconditional (or externally guided) sampling of periodic cells from a `DiffusionPrior`.

    atoms = sample_structures(prior, density_g_cm3=2.0, n_samples=4, seed=0)
    atoms = sample_structures(prior, density_g_cm3=2.0, extra_score=guidance)  # guidance hook

The atom count comes from the density and the cell (default: 216 atoms in a cubic cell whose edge
gives the density). All samples are integrated together as one batch of cells.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.graph import wrap_positions
from xanesdiff.diffusion.samplers import PredictorCorrector, Sampler

AMU_G = 1.66053906660e-24
DEFAULT_N_ATOMS = 216


def atom_mass_g(element: str = "C") -> float:
    """Mass (g) of one atom of `element`."""
    return float(atomic_masses[atomic_numbers[element]] * AMU_G)


def cubic_cell_for_density(n_atoms: int, density_g_cm3: float, element: str = "C") -> np.ndarray:
    """Cubic cell (3,3) Å holding `n_atoms` of `element` at `density_g_cm3`."""
    edge_A = (n_atoms * atom_mass_g(element) / density_g_cm3 * 1e24) ** (1 / 3)
    return np.eye(3) * edge_A


def density_of_cell(n_atoms: int, cell_A, element: str = "C") -> float:
    """Density (g/cm³) of `n_atoms` of `element` in the cell (3,3) Å."""
    volume_cm3 = abs(np.linalg.det(np.asarray(cell_A, dtype=float))) * 1e-24
    return float(n_atoms * atom_mass_g(element) / volume_cm3)


def resolve_cell_and_count(n_atoms: int | None = None, density_g_cm3: float | None = None,
                           cell_A=None, element: str = "C") -> tuple[int, np.ndarray]:
    """(atom count, cell) from any consistent subset of (n_atoms, density, cell)."""
    if density_g_cm3 is not None and not (0.1 <= float(density_g_cm3) <= 5.0):
        raise XanesdiffInputError(f"density {density_g_cm3} g/cm³ outside 0.1–5", "density")
    if cell_A is not None:
        cell = np.asarray(cell_A, dtype=float).reshape(3, 3)
        if np.linalg.det(cell) <= 1e-6:
            raise XanesdiffInputError("cell must be right-handed with positive volume", "cell")
        if n_atoms is None:
            if density_g_cm3 is None:
                raise XanesdiffInputError("give n_atoms or density with a cell", "cell")
            n_atoms = int(round(density_g_cm3 * np.linalg.det(cell) * 1e-24 / atom_mass_g(element)))
        return int(n_atoms), cell
    n_atoms = DEFAULT_N_ATOMS if n_atoms is None else int(n_atoms)
    if n_atoms < 1:
        raise XanesdiffInputError(f"n_atoms must be positive, got {n_atoms}", "n_atoms")
    if density_g_cm3 is None:
        raise XanesdiffInputError("give a density (g/cm³) or a cell", "density")
    return n_atoms, cubic_cell_for_density(n_atoms, float(density_g_cm3), element)


def sampler_config(name: str, overrides=()):
    """configs/sampler/<name>.yaml merged with dotlist `overrides` (e.g. "n_steps=50"). A sampler
    config may extend others of the group as hydra reads it (`defaults: [pc, _self_]`: pc's
    fields, then its own on top)."""
    from omegaconf import OmegaConf

    import xanesdiff

    path = xanesdiff.PACKAGE_ROOT / "configs" / "sampler" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise XanesdiffInputError(f"no sampler config {name!r}; expected one of {known}", "sampler")
    own = OmegaConf.load(path)
    bases = [sampler_config(base) for base in own.pop("defaults", []) if base != "_self_"]
    return OmegaConf.merge(*bases, own, OmegaConf.from_dotlist(list(overrides)))


def sampler_from_config(name: str, schedule, overrides=()) -> Sampler:
    """The sampler of configs/sampler/<name>.yaml with dotlist `overrides`, on `schedule`."""
    import hydra

    return hydra.utils.instantiate(sampler_config(name, overrides), schedule=schedule)


def default_sampler(schedule) -> Sampler:
    """The shipped default, configs/sampler/pc.yaml (the sampler `generate` and `sample` use)."""
    return sampler_from_config("pc", schedule)


def sample_structures(prior, n_atoms: int | None = None, density_g_cm3: float | None = None,
                      cell_A=None, n_samples: int = 1, seed: int = 0,
                      sampler: Sampler | None = None, element: str = "C",
                      extra_score: Callable[[torch.Tensor, float], torch.Tensor] | None = None
                      ) -> list[Atoms]:
    """Sample `n_samples` cells from `prior` (optionally plus `extra_score(pos, t)`, a callable on
    the concatenated positions (n_samples·N, 3) of all cells returning a score contribution).

    Runs on the prior's device (`prior.device`); random numbers come from a CPU generator seeded
    with `seed`, so a seed gives the same draws on any device. Returns a list of ASE Atoms."""
    n, cell = resolve_cell_and_count(n_atoms, density_g_cm3, cell_A, element)
    sampler = sampler or default_sampler(prior.schedule)
    device, dtype = prior.device, prior.dtype
    generator = torch.Generator().manual_seed(int(seed))
    cells = torch.as_tensor(cell, dtype=dtype).unsqueeze(0).repeat(n_samples, 1, 1)
    pos = torch.cat([prior.schedule.prior_sampling(n, cells[s], generator, dtype)
                     for s in range(n_samples)]).to(device)
    cells = cells.to(device)
    batch = torch.arange(n_samples, device=device).repeat_interleave(n)
    numbers = torch.full((n * n_samples,), atomic_numbers[element], dtype=torch.long,
                         device=device)

    def score_fn(x, t):
        s = prior.score_batch(x, cells, numbers, t, batch)
        if extra_score is not None:
            s = s + extra_score(x, t)
        return s

    def wrap_fn(x):
        return wrap_positions(x, cells, batch)

    prior.neighbors.clear()
    pos = sampler.sample(pos, score_fn, wrap_fn, generator,
                         density_g_cm3=density_of_cell(n, cell, element))
    pos = pos.reshape(n_samples, n, 3).cpu()
    return [Atoms(numbers=[atomic_numbers[element]] * n, positions=p.double().numpy(), cell=cell,
                  pbc=True) for p in pos]
