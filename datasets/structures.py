"""Reading structures (any ASE-readable file) with the checks a periodic model needs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase import Atoms

from xanesdiff.datasets.errors import XanesdiffInputError

MIN_PAIR_DISTANCE_A = 0.5
"""Pairs closer than this (Å) are overlapping atoms, not a structure."""


def read_structures(path: str | os.PathLike, index: str = ":") -> list[Atoms]:
    """Read every frame of `path` (POSCAR, extxyz, CIF, ...) and validate each.

    Raises `XanesdiffInputError` naming the file and frame for unreadable files, missing or
    degenerate cells, and overlapping atoms.
    """
    import ase.io

    path = Path(path)
    if not path.exists():
        raise XanesdiffInputError("structure file does not exist", str(path))
    try:
        frames = ase.io.read(str(path), index=index)
    except Exception as exc:  # ASE raises many types for unreadable input
        raise XanesdiffInputError(
            f"could not be read as a structure ({type(exc).__name__}: {exc}); expected a file ASE "
            "can read (POSCAR/.vasp, extxyz, CIF, ...)",
            str(path),
        ) from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise XanesdiffInputError("no frames in file", str(path))
    for i, atoms in enumerate(frames):
        validate_periodic_structure(atoms, f"{path} (frame {i})")
    return frames


def validate_periodic_structure(atoms: Atoms, source: str) -> None:
    """Check a structure is periodic in 3D with a right-handed, non-degenerate cell and no overlaps."""
    if len(atoms) == 0:
        raise XanesdiffInputError("structure has no atoms", source)
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        raise XanesdiffInputError(
            "structure has no 3D periodic cell; expected a bulk cell with pbc on all three axes "
            f"(pbc={atoms.pbc.tolist()}, cell rank {atoms.cell.rank})",
            source,
        )
    volume = float(np.linalg.det(atoms.cell.array))
    if volume <= 1e-6:
        raise XanesdiffInputError(
            f"cell volume {volume:.4g} Å^3: "
            + ("left-handed cell (negative determinant); reorder the lattice vectors"
               if volume < -1e-6 else "zero-volume cell")
            ,
            source,
        )
    if not np.isfinite(atoms.positions).all():
        raise XanesdiffInputError("non-finite atomic positions", source)
    dmin = minimum_distance(atoms)
    if dmin < MIN_PAIR_DISTANCE_A:
        raise XanesdiffInputError(
            f"overlapping atoms: closest pair {dmin:.3f} Å apart, expected at least "
            f"{MIN_PAIR_DISTANCE_A} Å",
            source,
        )


def check_elements(atoms: Atoms, supported: set[str] | list[str], source: str) -> None:
    """Refuse elements a model was not trained for, naming them and the supported ones."""
    present = set(atoms.get_chemical_symbols())
    unknown = sorted(present - set(supported))
    if unknown:
        raise XanesdiffInputError(
            f"element(s) {', '.join(unknown)} not supported: the models were trained for "
            f"{', '.join(sorted(supported))} only", source)


def minimum_distance(atoms: Atoms, cutoff_A: float = 2.0) -> float:
    """Smallest interatomic distance (Å) under periodic boundaries; `cutoff_A` if none is closer."""
    from xanesdiff.datasets.graph import periodic_neighbor_list

    i, j, shift, dist = periodic_neighbor_list(atoms.positions, atoms.cell.array, cutoff_A)
    return float(dist.min()) if len(dist) else float(cutoff_A)


def density_g_cm3(atoms: Atoms) -> float:
    """Mass density (g/cm³) of a periodic cell."""
    amu_g = 1.66053906660e-24
    return float(atoms.get_masses().sum() * amu_g / (atoms.get_volume() * 1e-24))
