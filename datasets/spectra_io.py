"""Reading and writing spectra files, with validation that names the file and the problem."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xanesdiff.datasets.errors import XanesdiffInputError


def _parse_numeric_table(path: Path, delimiter: str | None, skip_header: bool) -> np.ndarray:
    """Parse a table of floats; errors name the line and the offending cell."""
    if not path.exists():
        raise XanesdiffInputError("file does not exist", str(path))
    text = path.read_text(errors="replace").splitlines()
    rows: list[list[float]] = []
    width = None
    for lineno, line in enumerate(text, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        cells = stripped.split(delimiter) if delimiter else stripped.replace(",", " ").split()
        try:
            values = [float(c) for c in cells]
        except ValueError:
            if skip_header and not rows:
                continue
            bad = next(c for c in cells if not _is_float(c))
            raise XanesdiffInputError(
                f"line {lineno}: non-numeric value {bad!r}; expected numbers only", str(path)
            ) from None
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise XanesdiffInputError(
                f"line {lineno}: {len(values)} columns, expected {width} like the lines before",
                str(path),
            )
        rows.append(values)
    if not rows:
        raise XanesdiffInputError("file is empty (no numeric rows)", str(path))
    table = np.asarray(rows, dtype=np.float64)
    bad = ~np.isfinite(table)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise XanesdiffInputError(
            f"non-finite value {table[r, c]} at data row {r + 1}, column {c + 1}", str(path)
        )
    return table


def _is_float(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def read_site_spectra(
    path: str | os.PathLike, n_sites: int | None = None, n_energies: int | None = None
) -> np.ndarray:
    """Read a per-site spectra file: one row per absorbing atom, one column per energy point.

    Whitespace- or comma-separated; a non-numeric first line (header) is skipped. Validates the
    number of rows against `n_sites` and columns against `n_energies` when given.
    Returns float32 array (n_sites, n_energies).
    """
    path = Path(path)
    table = _parse_numeric_table(path, None, skip_header=True)
    if n_sites is not None and table.shape[0] != n_sites:
        raise XanesdiffInputError(
            f"{table.shape[0]} spectrum rows but the structure has {n_sites} absorbing atoms; "
            "expected one row per absorbing atom, in the structure's atom order",
            str(path),
        )
    if n_energies is not None and table.shape[1] != n_energies:
        raise XanesdiffInputError(
            f"{table.shape[1]} energy columns, expected {n_energies} (the dataset's energy grid)",
            str(path),
        )
    if (table < -1e-6).any():
        r, c = np.argwhere(table < -1e-6)[0]
        raise XanesdiffInputError(
            f"negative intensity {table[r, c]:.4g} at row {r + 1}, column {c + 1}; "
            "absorption cross-sections are non-negative",
            str(path),
        )
    return table.astype(np.float32)


def read_two_column(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a two-column (energy eV, intensity) text/CSV file. Extra columns are an error."""
    path = Path(path)
    table = _parse_numeric_table(path, None, skip_header=True)
    if table.shape[1] != 2:
        raise XanesdiffInputError(
            f"{table.shape[1]} column(s); expected two columns: energy (eV) and intensity", str(path)
        )
    if table.shape[0] < 5:
        raise XanesdiffInputError(
            f"only {table.shape[0]} data rows; a spectrum needs at least 5 points", str(path)
        )
    return table[:, 0], table[:, 1]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` through a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_spectra_csv(
    path: str | os.PathLike, energy_eV: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    """Write spectra as CSV: first column `energy_eV`, then one column per named spectrum."""
    names = ["energy_eV", *columns]
    data = np.column_stack([np.asarray(energy_eV)] + [np.asarray(v) for v in columns.values()])
    lines = [",".join(names)] + [",".join(f"{x:.10g}" for x in row) for row in data]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_spectra_csv(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inverse of `write_spectra_csv`: returns (energy_eV, {name: spectrum})."""
    path = Path(path)
    header = path.read_text().splitlines()[0].split(",")
    if header[0] != "energy_eV":
        raise XanesdiffInputError(
            f"first header cell is {header[0]!r}, expected 'energy_eV'", str(path)
        )
    table = _parse_numeric_table(path, ",", skip_header=True)
    return table[:, 0], {name: table[:, i] for i, name in enumerate(header[1:], start=1)}
