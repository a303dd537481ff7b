"""Density of a target spectrum from reference spectra of known density.

The reference networks' mean spectra (g/cm³ → spectrum) are joined piecewise linearly, and the
density whose interpolated spectrum is closest (MAE) to the target is the estimate. Leaving each
interior a-C network out in turn, the other four place it within 0.06 g/cm³; scoring samples of
the prior instead (`DensitySearch`, `density_search=scan`) inherits the prior's own spectral bias
and lands 0.3–0.7 g/cm³ too high (benchmarks/guidance.json, benchmarks/guidance_scan.json).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReferenceCurve:
    """Mean spectra of reference networks, ordered by density.

    densities_g_cm3: (R,) g/cm³, strictly increasing; spectra: (R, M) on the target's grid."""

    densities_g_cm3: np.ndarray
    spectra: np.ndarray

    def __post_init__(self):
        order = np.argsort(self.densities_g_cm3)
        self.densities_g_cm3 = np.asarray(self.densities_g_cm3, dtype=np.float64)[order]
        self.spectra = np.asarray(self.spectra, dtype=np.float64)[order]
        if len(self.densities_g_cm3) < 2:
            raise ValueError("a density curve needs reference spectra at two densities or more")

    def spectrum_at(self, density_g_cm3: float) -> np.ndarray:
        """Linear interpolation between the two neighbouring references (clamped at the ends)."""
        d = np.clip(density_g_cm3, self.densities_g_cm3[0], self.densities_g_cm3[-1])
        k = int(np.clip(np.searchsorted(self.densities_g_cm3, d) - 1, 0,
                        len(self.densities_g_cm3) - 2))
        lo, hi = self.densities_g_cm3[k:k + 2]
        w = (d - lo) / (hi - lo)
        return (1 - w) * self.spectra[k] + w * self.spectra[k + 1]

    def mismatch(self, target: np.ndarray, density_g_cm3: float) -> float:
        return float(np.abs(self.spectrum_at(density_g_cm3) - target).mean())


def reference_curve_from_dataset(dataset, energies_eV: np.ndarray,
                                 exclude_g_cm3: tuple = (), tolerance_g_cm3: float = 0.1
                                 ) -> ReferenceCurve:
    """One reference per network of `dataset` (mean over its frames), interpolated onto
    `energies_eV`; the network at each density of `exclude_g_cm3` (within `tolerance_g_cm3`) is
    left out (leave-one-density-out benchmarks)."""
    excluded = set(dataset.networks_at(exclude_g_cm3, tolerance_g_cm3,
                                       "density_search.exclude_g_cm3"))
    densities, spectra = [], []
    for network in [n for n in dataset.networks if n not in excluded]:
        mean = np.mean([f.mean_spectrum for f in dataset.frames_of([network])], axis=0)
        densities.append(dataset.network_density(network))
        spectra.append(np.interp(energies_eV, dataset.grid.energies_eV, mean))
    return ReferenceCurve(np.array(densities), np.array(spectra))


@dataclass
class ReferenceDensity:
    """Infer the density by matching the target against the training networks' spectra.

    dataset: path of the reference dataset (null: the a-C asset); exclude_g_cm3: networks to
    leave out; step_g_cm3: resolution of the scan along the curve (g/cm³)."""

    dataset: str | None = None
    exclude_g_cm3: list = field(default_factory=list)
    step_g_cm3: float = 0.01

    def curve(self, energies_eV: np.ndarray) -> ReferenceCurve:
        from xanesdiff.datasets.dataset import load_dataset
        from xanesdiff.datasets.errors import MissingAssetError

        try:
            dataset = load_dataset(self.dataset)
        except MissingAssetError as exc:
            raise MissingAssetError(f"{exc} The density is inferred from these reference "
                                    f"spectra: give density=… or density_search=scan to do "
                                    f"without them.") from None
        return reference_curve_from_dataset(dataset, energies_eV, tuple(self.exclude_g_cm3))

    def run(self, generator, target: np.ndarray, progress=None) -> tuple[float, list[dict]]:
        """(density in g/cm³, scan rows {density_g_cm3, mae, stage}); `generator` supplies the
        surrogate's energy grid (the target is on it)."""
        curve = self.curve(generator.surrogate.grid.energies_eV)
        return infer_density(curve, np.asarray(target, dtype=np.float64), self.step_g_cm3)


def infer_density(curve: ReferenceCurve, target: np.ndarray, step_g_cm3: float = 0.01
                  ) -> tuple[float, list[dict]]:
    lo, hi = curve.densities_g_cm3[0], curve.densities_g_cm3[-1]
    grid = np.append(np.arange(lo, hi, step_g_cm3), hi)
    maes = np.array([curve.mismatch(target, d) for d in grid])
    best = float(grid[int(np.argmin(maes))])
    scan = [{"density_g_cm3": float(d), "mae": float(m), "stage": "interpolated"}
            for d, m in zip(grid, maes)]
    scan += [{"density_g_cm3": float(d), "mae": curve.mismatch(target, d), "stage": "references"}
             for d in curve.densities_g_cm3]
    if best in (lo, hi):
        warnings.warn(f"the target matches the reference spectra best at the end of their "
                      f"range ({best:.2f} g/cm³): the film may lie outside {lo:.2f}–{hi:.2f} "
                      f"g/cm³; give density= to override", stacklevel=2)
    return best, scan
