"""The library database: one ASE-database row per plan item, written in one transaction.

A row's `unique_id` is the item key (the database's UNIQUE constraint then makes a second row for
one item impossible, even from two processes). Searchable scalars (status, reason, target, density,
seed, steer, validation metrics, …) are key-value pairs; spectra, fingerprints and the full
provenance are in `data`. The database's metadata records the settings it was made with, so a rerun
with other settings is refused instead of mixing two libraries.

A file path (`library.db`) is SQLite; `postgresql://user:pass@host/name` is PostgreSQL (needs the
`ase-db-backends` and `psycopg2` packages); the code is the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xanesdiff.datasets.errors import XanesdiffInputError

META_KEY = "xanesdiff_library"
DEFAULT_COLUMNS = ["id", "formula", "status", "density_g_cm3", "steer", "seed", "mae", "sp2",
                   "sp3", "cn1", "min_distance_A"]


def is_server_url(url: str) -> bool:
    return "://" in str(url)


class LibraryStore:
    """Thin wrapper over `ase.db.connect(url)` for library rows."""

    def __init__(self, url: str | os.PathLike, create: bool = True):
        import ase.db

        self.url = str(url)
        if not is_server_url(self.url):
            path = Path(self.url)
            if not create and not path.is_file():
                raise XanesdiffInputError("library database does not exist", self.url)
            path.parent.mkdir(parents=True, exist_ok=True)
            # No ASE lock file: SQLite locks itself, and a lock file left by a killed process
            # would make the resumed run wait forever.
            self.db = ase.db.connect(str(path), type="db", use_lock_file=False)
        else:
            self.db = ase.db.connect(self.url)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def library_metadata(self) -> dict | None:
        return self.db.metadata.get(META_KEY)

    def set_library_metadata(self, meta: dict) -> None:
        metadata = self.db.metadata
        metadata[META_KEY] = meta
        metadata.setdefault("title", "xanesdiff structure library")
        metadata.setdefault("default_columns", DEFAULT_COLUMNS)
        self.db.metadata = metadata

    def check_settings(self, settings_id: str) -> None:
        """Refuse a database holding rows made with different settings."""
        meta = self.library_metadata
        if meta is None:
            if self.count() > 0:
                raise XanesdiffInputError(
                    "holds rows but no xanesdiff library metadata: not a library database; "
                    "choose another db=…", self.url)
            return
        if meta.get("settings_id") != settings_id:
            raise XanesdiffInputError(
                f"holds a library made with different settings (settings {meta.get('settings_id')}"
                f", this run {settings_id}: models, guidance, sampler, validation or filters "
                "differ); choose another db/out or pass overwrite=true", self.url)

    # -- rows -------------------------------------------------------------------------------
    def count(self, **selection) -> int:
        return self.db.count(**selection)

    def keys(self) -> set[str]:
        return {row.unique_id for row in self.db.select(include_data=False)}

    def has(self, key: str) -> bool:
        return self.db.count(unique_id=key) > 0

    def write(self, key: str, atoms, key_value_pairs: dict, data: dict, ctime: float | None = None,
              user: str | None = None) -> int | None:
        """Write one row (one transaction). Returns its id, or None if the key already exists."""
        from ase.db.core import now
        from ase.db.row import AtomsRow

        row = AtomsRow(atoms)
        row.unique_id = key
        row.ctime = now() if ctime is None else ctime
        row.user = os.getenv("USER") if user is None else user
        try:
            return self.db.write(row, key_value_pairs=_clean_kvp(key_value_pairs), data=data)
        except Exception:
            if self.has(key):  # UNIQUE(unique_id): another writer got there first
                return None
            raise

    def rows(self, include_data: bool = False, **selection):
        return self.db.select(include_data=include_data, **selection)

    def get(self, **selection):
        return self.db.get(**selection)

    def clear(self) -> None:
        """Delete every row and the library metadata (overwrite=true)."""
        ids = [row.id for row in self.db.select(include_data=False)]
        if ids:
            self.db.delete(ids)
        metadata = self.db.metadata
        metadata.pop(META_KEY, None)
        self.db.metadata = metadata


def _clean_kvp(kvp: dict) -> dict:
    """Python scalars only; None values dropped (ASE refuses them)."""
    out = {}
    for key, value in kvp.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
        else:
            out[key] = str(value)
    return out
