"""Export library rows for downstream training (reads the database only: no models needed).

Into `out/`:
- `structures.extxyz`: every exported structure, its key-value pairs (status, metrics,
  provenance scalars) and `item_key` in `info`;
- `poscar/<item_key>.vasp`: one POSCAR per structure (direct coordinates);
- `site_spectra/<item_key>.csv`: predicted spectrum of each absorbing atom, one row per atom in the
  structure's atom order, one column per energy (header `E_<eV>`): the per-site format
  `xanesdiff generate target=…` and the dataset loader read; `site_spectra/mean_spectra.csv`:
  `energy_eV` then one column per structure (predicted mean, and `target` spectra by target id);
- `index.csv`: one line per exported structure (item key, status, target, density, steer, seed,
  metrics) — the join table between all of the above.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.spectra_io import atomic_write_text, write_spectra_csv
from xanesdiff.guidance.report import write_extxyz
from xanesdiff.library.store import LibraryStore

FORMATS = ("extxyz", "poscar", "site_spectra")
INDEX_COLUMNS = ["item_key", "item_index", "status", "reason", "target", "target_sha256",
                 "density_g_cm3", "steer", "seed", "n_atoms", "mae", "spearman", "cosine",
                 "judge_mae", "sp", "sp2", "sp3", "cn1", "mean_cn", "min_distance_A",
                 "energy_per_atom_after_eV"]


def _row_atoms(row, positions: str):
    atoms = row.toatoms()
    if positions == "relaxed":
        if "relaxed_positions" not in row.data:
            raise XanesdiffInputError(
                f"row {row.unique_id} has no relaxed positions (generated with validation.relax="
                "false); use export.positions=generated", "export.positions")
        atoms.positions = row.data["relaxed_positions"]
    atoms.info = {"item_key": row.unique_id, **row.key_value_pairs}
    return atoms


def export_library(url: str, out: str | Path, formats=FORMATS, status: str = "accepted",
                   positions: str = "generated") -> dict:
    """Write the chosen formats for rows of the chosen status; returns counts."""
    import ase.io

    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise XanesdiffInputError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS}",
                                  "export.formats")
    if status not in ("accepted", "rejected", "all"):
        raise XanesdiffInputError(f"status {status!r}: accepted | rejected | all", "export.status")
    if positions not in ("generated", "relaxed"):
        raise XanesdiffInputError(f"positions {positions!r}: generated | relaxed",
                                  "export.positions")
    store = LibraryStore(url, create=False)
    selection = {} if status == "all" else {"status": status}
    rows = sorted(store.rows(include_data=True, **selection),
                  key=lambda r: (r.get("item_index", 0), r.unique_id))
    rows = [r for r in rows if r.natoms > 0]  # rows of failed sampling have no structure
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = [_row_atoms(r, positions) for r in rows]
    counts = {"rows": len(rows)}
    if "extxyz" in formats:
        write_extxyz(out / "structures.extxyz", frames)
        counts["extxyz"] = len(frames)
    if "poscar" in formats:
        folder = out / "poscar"
        folder.mkdir(exist_ok=True)
        for row, atoms in zip(rows, frames):
            text = io.StringIO()
            ase.io.write(text, atoms, format="vasp", direct=True)
            atomic_write_text(folder / f"{row.unique_id}.vasp", text.getvalue())
        counts["poscar"] = len(frames)
    if "site_spectra" in formats:
        counts["site_spectra"] = _write_spectra(rows, out / "site_spectra")
    atomic_write_text(out / "index.csv", _index_csv(rows))
    return counts


def _write_spectra(rows, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    written, columns, grid = 0, {}, None
    for row in rows:
        if "energies_eV" not in row.data:
            continue
        energies = np.asarray(row.data["energies_eV"])
        if grid is None:
            grid = energies
        if "site_spectra" in row.data:
            header = ",".join(f"E_{e:.4f}" for e in energies)
            lines = [header] + [",".join(f"{x:.6g}" for x in site)
                                for site in np.asarray(row.data["site_spectra"])]
            atomic_write_text(folder / f"{row.unique_id}.csv", "\n".join(lines) + "\n")
            written += 1
        if np.allclose(energies, grid) and "predicted" in row.data:
            columns[row.unique_id] = np.asarray(row.data["predicted"])
            if "target_spectrum" in row.data:
                columns.setdefault(f"target_{row.get('target_sha256', '')[7:19]}",
                                   np.asarray(row.data["target_spectrum"]))
    if grid is not None and columns:
        write_spectra_csv(folder / "mean_spectra.csv", grid, columns)
    return written


def _index_csv(rows) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for row in rows:
        kvp = {"item_key": row.unique_id, **row.key_value_pairs}
        writer.writerow(["" if kvp.get(c) is None else kvp[c] for c in INDEX_COLUMNS])
    return text.getvalue()
