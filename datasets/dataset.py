"""Structure + per-site spectra datasets, grouped into networks.

A *frame* is one structure with one spectrum per absorbing atom. Frames that are thermal
snapshots of one network (same cell, same composition, atoms possibly re-ordered) share a
`network` id; every split in `xanesdiff.datasets.splits` is by network, never by atom or frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from xanesdiff.datasets.assets import resolve_asset
from xanesdiff.datasets.energy_grid import EnergyGrid
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.spectra_io import read_site_spectra
from xanesdiff.datasets.structures import density_g_cm3, read_structures


@dataclass
class Frame:
    """One structure with per-site spectra (rows follow `absorber_indices`)."""

    name: str
    atoms: Atoms
    site_spectra: np.ndarray
    absorber_indices: np.ndarray
    network: str = ""
    density_g_cm3: float = field(init=False)

    def __post_init__(self):
        self.density_g_cm3 = density_g_cm3(self.atoms)

    @property
    def mean_spectrum(self) -> np.ndarray:
        return self.site_spectra.mean(axis=0)


@dataclass
class XasDataset:
    frames: list[Frame]
    grid: EnergyGrid
    absorber: str

    @property
    def networks(self) -> list[str]:
        return sorted({f.network for f in self.frames}, key=lambda n: self.network_density(n))

    def network_density(self, network: str) -> float:
        return float(np.mean([f.density_g_cm3 for f in self.frames if f.network == network]))

    def networks_at(self, densities_g_cm3, tol_g_cm3: float = 0.1,
                    field: str = "exclude_densities") -> list[str]:
        """The one network within `tol_g_cm3` of each density (g/cm³); a density that matches
        none or several is an error naming `field`."""
        found = []
        for rho in densities_g_cm3:
            matches = [n for n in self.networks
                       if abs(self.network_density(n) - float(rho)) <= tol_g_cm3]
            if len(matches) != 1:
                available = ", ".join(f"{self.network_density(n):.2f}" for n in self.networks)
                raise XanesdiffInputError(f"density {rho} matches {len(matches)} networks; "
                                          f"available: {available}", field)
            found += matches
        return found

    def frames_of(self, networks) -> list[Frame]:
        wanted = set(networks)
        return [f for f in self.frames if f.network in wanted]

    def __len__(self) -> int:
        return len(self.frames)


def load_frame(
    structure_path: str | os.PathLike,
    spectra_path: str | os.PathLike,
    grid: EnergyGrid,
    absorber: str = "C",
) -> Frame:
    """Read one structure and its per-site spectra, checking rows match the absorbing atoms."""
    atoms = read_structures(structure_path, index="-1")[0]
    absorbers = np.flatnonzero(np.array(atoms.get_chemical_symbols()) == absorber)
    if len(absorbers) == 0:
        raise XanesdiffInputError(f"no {absorber} atoms to absorb", str(structure_path))
    spectra = read_site_spectra(spectra_path, n_sites=len(absorbers), n_energies=grid.n_points)
    return Frame(Path(structure_path).stem, atoms, spectra, absorbers)


def assign_networks(frames: list[Frame], cell_tol_A: float = 1e-3) -> None:
    """Give frames that share composition and cell (within `cell_tol_A`) one network id.

    Snapshots of one network in this kind of data keep the cell and re-order atoms; the id is
    the rounded density, e.g. ``rho2.49``, which also makes splits readable.
    """
    groups: list[tuple[str, np.ndarray, list[Frame]]] = []
    for frame in frames:
        formula = frame.atoms.get_chemical_formula()
        for g_formula, g_cell, members in groups:
            if g_formula == formula and np.abs(g_cell - frame.atoms.cell.array).max() < cell_tol_A:
                members.append(frame)
                break
        else:
            groups.append((formula, frame.atoms.cell.array.copy(), [frame]))
    used: set[str] = set()
    for _, _, members in groups:
        name = f"rho{np.mean([m.density_g_cm3 for m in members]):.2f}"
        while name in used:
            name += "'"
        used.add(name)
        for m in members:
            m.network = name


def load_dataset(
    root: str | os.PathLike | None = None,
    asset: str = "data/a-C",
    structures_dir: str = "structures",
    spectra_dir: str = "spectra",
    structure_glob: str = "*.vasp",
    spectra_suffix: str = ".txt",
    absorber: str = "C",
    grid: dict | EnergyGrid | None = None,
) -> XasDataset:
    """Load every structure in `root/structures_dir` with its spectra file `root/spectra_dir/NAME.txt`."""
    root = resolve_asset(asset, root)
    grid = grid if isinstance(grid, EnergyGrid) else EnergyGrid.from_dict(grid or A_C_GRID)
    structure_files = sorted((root / structures_dir).glob(structure_glob))
    if not structure_files:
        raise XanesdiffInputError(
            f"no structure files matching {structure_glob!r} in {root / structures_dir}", str(root))
    frames = []
    for path in structure_files:
        spectra = root / spectra_dir / (path.stem + spectra_suffix)
        if not spectra.exists():
            raise XanesdiffInputError(
                f"no spectra file for structure {path.name}; expected {spectra}", str(path))
        frames.append(load_frame(path, spectra, grid, absorber))
    assign_networks(frames)
    return XasDataset(frames, grid, absorber)


A_C_GRID = {"start_eV": 275.08, "step_eV": 0.38235, "n_points": 100}
"""Approximate a-C grid (±1 eV): graphite π* at index 27 = 285.4 eV, σ* at 44 = 291.9 eV."""
