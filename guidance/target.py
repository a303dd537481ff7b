"""What the user aims at: a target spectrum on the surrogate's grid, from any of the accepted files.

- a two-column file (energy eV, intensity): measured or simulated elsewhere; aligned on a feature
  (or a given shift) and normalised onto the model grid;
- a CSV written by `xanesdiff predict` (header `energy_eV,…`): the `mean` column, already on grid;
- a per-site spectra file (one row per absorbing atom, grid-many columns): the mean over rows;
- a structure file (POSCAR, extxyz, CIF, …): the surrogate's predicted mean spectrum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.experimental import MeasuredSpectrum, prepare_target
from xanesdiff.datasets.spectra_io import _parse_numeric_table, read_site_spectra
from xanesdiff.guidance.validation import predict_members

STRUCTURE_SUFFIXES = {".vasp", ".poscar", ".cif", ".extxyz", ".xyz", ".traj", ".json", ".pdb"}

MODEL_AREA = 22.0
"""Sum over the 100 grid points of an a-C mean spectrum (21.9–22.5 across the dataset's frames):
the scale a measured spectrum is normalised to."""


@dataclass
class Target:
    """A target spectrum on the model grid, with where it came from and how it was prepared."""

    spectrum: np.ndarray
    source: str
    kind: str
    details: dict = field(default_factory=dict)


def _is_structure(path: Path) -> bool:
    name = path.name.upper()
    return path.suffix.lower() in STRUCTURE_SUFFIXES or name.startswith(("POSCAR", "CONTCAR"))


def load_target(path: str | os.PathLike, surrogate, *, shift_eV: float | None = None,
                align_feature_eV: float | None = 285.4, pre_edge_eV=None,
                normalisation: str = "area", area: float = MODEL_AREA) -> Target:
    """Read `path` as one of the accepted kinds and return its spectrum on `surrogate.grid`."""
    path = Path(path)
    if not path.exists():
        raise XanesdiffInputError("target file does not exist", str(path))
    grid = surrogate.grid
    if _is_structure(path):
        from xanesdiff.datasets.structures import read_structures

        from xanesdiff.datasets.structures import check_elements

        frames = read_structures(path)
        spectra = []
        for k, atoms in enumerate(frames):
            check_elements(atoms, {surrogate.absorber}, f"{path} (frame {k})")
            spectra.append(predict_members(surrogate, atoms).mean(0))
        return Target(np.mean(spectra, axis=0), str(path), "structure", {"frames": len(frames)})
    header = path.read_text(errors="replace").lstrip().splitlines()[:1]
    if header and header[0].split(",")[0].strip() == "energy_eV" and header[0].count(",") >= 2:
        from xanesdiff.datasets.spectra_io import read_spectra_csv

        energy, columns = read_spectra_csv(path)
        name = "mean" if "mean" in columns else next(iter(columns))
        measured = MeasuredSpectrum(energy, columns[name], f"{path} (column {name})")
        return _two_column_target(measured, grid, shift_eV, align_feature_eV, pre_edge_eV,
                                  normalisation, area, "prediction_csv")
    table = _parse_numeric_table(path, None, skip_header=True)
    if table.shape[1] == 2:
        measured = MeasuredSpectrum(table[:, 0], table[:, 1], str(path))
        return _two_column_target(measured, grid, shift_eV, align_feature_eV, pre_edge_eV,
                                  normalisation, area, "two_column")
    if table.shape[1] == grid.n_points:
        sites = read_site_spectra(path, n_energies=grid.n_points)
        return Target(sites.mean(axis=0).astype(np.float64), str(path), "per_site",
                      {"sites": int(sites.shape[0])})
    raise XanesdiffInputError(
        f"{table.shape[1]} column(s): expected 2 (energy eV, intensity), {grid.n_points} "
        "(per-site spectra on the model grid, one row per atom), or a structure file", str(path))


def _two_column_target(measured, grid, shift_eV, align_feature_eV, pre_edge_eV, normalisation,
                       area, kind) -> Target:
    on_model_grid = (len(measured.energy_eV) == grid.n_points
                     and np.allclose(measured.energy_eV, grid.energies_eV, atol=1e-3))
    if on_model_grid and shift_eV is None:
        # Already on the model's energy scale (e.g. written by `xanesdiff predict`): keep it.
        shift_eV, align_feature_eV = 0.0, None
    spectrum, applied = prepare_target(measured, grid, shift_eV=shift_eV,
                                       align_feature_eV=align_feature_eV, pre_edge_eV=pre_edge_eV,
                                       normalisation=normalisation, area=area)
    return Target(spectrum, measured.source, kind,
                  {"shift_eV": applied, "normalisation": normalisation, "on_model_grid": on_model_grid})
