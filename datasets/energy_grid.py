"""The energy axis (eV) that per-site spectra are sampled on: dataset metadata, not data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EnergyGrid:
    """Evenly spaced energies: `start_eV + step_eV * k`, k = 0 … n_points−1."""

    start_eV: float
    step_eV: float
    n_points: int

    @property
    def energies_eV(self) -> np.ndarray:
        return self.start_eV + self.step_eV * np.arange(self.n_points)

    def index_of(self, energy_eV: float) -> int:
        """Nearest grid index to an energy (eV)."""
        return int(np.clip(round((energy_eV - self.start_eV) / self.step_eV), 0, self.n_points - 1))

    def to_dict(self) -> dict:
        return {"start_eV": self.start_eV, "step_eV": self.step_eV, "n_points": self.n_points}

    @classmethod
    def from_dict(cls, d: dict) -> "EnergyGrid":
        return cls(float(d["start_eV"]), float(d["step_eV"]), int(d["n_points"]))
