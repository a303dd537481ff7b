"""Measured (or externally simulated) spectra onto the model's energy grid.

Steps, each a small function: read → check → subtract pre-edge → align energy → interpolate →
normalise. `prepare_target` chains them with the defaults a carbon K-edge needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from xanesdiff.datasets.energy_grid import EnergyGrid
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.spectra_io import read_two_column

PI_STAR_eV = 285.4
"""Carbon 1s→π* peak energy (eV) on the model grid (graphite reference, see the data README)."""


@dataclass
class MeasuredSpectrum:
    """A spectrum on its own energy axis (eV); `source` names where it came from for errors."""

    energy_eV: np.ndarray
    intensity: np.ndarray
    source: str = "spectrum"

    def __post_init__(self):
        self.energy_eV = np.asarray(self.energy_eV, dtype=np.float64)
        self.intensity = np.asarray(self.intensity, dtype=np.float64)
        check_spectrum(self.energy_eV, self.intensity, self.source)


def check_spectrum(energy_eV: np.ndarray, intensity: np.ndarray, source: str) -> None:
    """Reject what would silently give a wrong target: non-finite values, energies that are not
    strictly increasing, duplicated energies, energies that look like keV."""
    if energy_eV.shape != intensity.shape or energy_eV.ndim != 1:
        raise XanesdiffInputError(
            f"energy and intensity must be 1-D of equal length, got {energy_eV.shape} and "
            f"{intensity.shape}", source)
    for name, values in (("energy", energy_eV), ("intensity", intensity)):
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise XanesdiffInputError(f"non-finite {name} at data row {bad[0] + 1}", source)
    steps = np.diff(energy_eV)
    if (steps == 0).any():
        row = int(np.flatnonzero(steps == 0)[0]) + 2
        raise XanesdiffInputError(
            f"duplicated energy {energy_eV[row - 1]:.3f} eV at data row {row}; expected strictly "
            "increasing energies", source)
    if (steps < 0).any():
        row = int(np.flatnonzero(steps < 0)[0]) + 2
        raise XanesdiffInputError(
            f"energies are not increasing at data row {row} ({energy_eV[row - 2]:.3f} → "
            f"{energy_eV[row - 1]:.3f} eV); expected strictly increasing energies in eV", source)
    if energy_eV.max() < 10.0:
        raise XanesdiffInputError(
            f"energies span {energy_eV.min():.4g}–{energy_eV.max():.4g}: these look like keV; "
            "expected eV (multiply by 1000)", source)


def read_measured(path: str | os.PathLike) -> MeasuredSpectrum:
    """Two-column text/CSV file: energy (eV), intensity. Header and `#` comments are skipped."""
    energy, intensity = read_two_column(path)
    return MeasuredSpectrum(energy, intensity, str(path))


def from_pymatgen(xas) -> MeasuredSpectrum:
    """A pymatgen `XAS` object (x: energy eV, y: absorption)."""
    return MeasuredSpectrum(np.asarray(xas.x), np.asarray(xas.y),
                            f"pymatgen XAS ({getattr(xas, 'absorbing_element', '?')})")


def subtract_pre_edge(spectrum: MeasuredSpectrum, pre_edge_eV: tuple[float, float]) -> MeasuredSpectrum:
    """Subtract a straight line fitted to the pre-edge window (eV). Needs ≥ 3 points there."""
    lo, hi = pre_edge_eV
    mask = (spectrum.energy_eV >= lo) & (spectrum.energy_eV <= hi)
    if mask.sum() < 3:
        raise XanesdiffInputError(
            f"pre-edge window {lo}–{hi} eV holds {int(mask.sum())} points; need at least 3 "
            f"(data covers {spectrum.energy_eV.min():.1f}–{spectrum.energy_eV.max():.1f} eV)",
            spectrum.source)
    slope, offset = np.polyfit(spectrum.energy_eV[mask], spectrum.intensity[mask], 1)
    return MeasuredSpectrum(spectrum.energy_eV,
                            spectrum.intensity - (slope * spectrum.energy_eV + offset),
                            spectrum.source)


def peak_position_eV(energy_eV: np.ndarray, intensity: np.ndarray, window_eV: tuple[float, float],
                     source: str = "spectrum") -> float:
    """Position (eV) of the most prominent local maximum inside a window, refined by a parabola
    through its neighbours. A shoulder or a rising edge is not a peak: then this raises."""
    from scipy.signal import find_peaks

    peaks, props = find_peaks(intensity, prominence=0.0)
    inside = (energy_eV[peaks] >= window_eV[0]) & (energy_eV[peaks] <= window_eV[1])
    if not inside.any():
        raise XanesdiffInputError(
            f"no peak between {window_eV[0]:.1f} and {window_eV[1]:.1f} eV to align on; give the "
            "energy shift explicitly (shift_eV=…) or another feature window", source)
    k = int(peaks[inside][np.argmax(props["prominences"][inside])])
    y0, y1, y2 = intensity[k - 1:k + 2]
    denom = y0 - 2 * y1 + y2
    frac = float(np.clip(0.5 * (y0 - y2) / denom, -1.0, 1.0)) if denom != 0 else 0.0
    step = energy_eV[k + 1] - energy_eV[k] if frac > 0 else energy_eV[k] - energy_eV[k - 1]
    return float(energy_eV[k] + frac * step)


def feature_shift_eV(spectrum: MeasuredSpectrum, feature_eV: float = PI_STAR_eV,
                     window_eV: tuple[float, float] | None = None) -> float:
    """Shift (eV) that moves the spectrum's peak in `window_eV` (default: `feature_eV` ± 4 eV)
    onto `feature_eV`."""
    window_eV = window_eV or (feature_eV - 4.0, feature_eV + 4.0)
    return feature_eV - peak_position_eV(spectrum.energy_eV, spectrum.intensity, tuple(window_eV),
                                         spectrum.source)


def onto_grid(spectrum: MeasuredSpectrum, grid: EnergyGrid, shift_eV: float = 0.0) -> np.ndarray:
    """Linear interpolation of the shifted spectrum onto the grid; the data must cover the grid."""
    energy = spectrum.energy_eV + shift_eV
    target = grid.energies_eV
    tol = 1e-6 * grid.step_eV
    if energy.min() > target[0] + tol or energy.max() < target[-1] - tol:
        raise XanesdiffInputError(
            f"measured range {energy.min():.2f}–{energy.max():.2f} eV (after a shift of "
            f"{shift_eV:+.2f} eV) does not cover the model grid {target[0]:.2f}–{target[-1]:.2f} eV",
            spectrum.source)
    return np.interp(target, energy, spectrum.intensity)


def normalise(intensity: np.ndarray, mode: str, grid: EnergyGrid, source: str,
              area: float | None = None, post_edge_eV: tuple[float, float] | None = None
              ) -> np.ndarray:
    """`area`: scale so the sum over grid points equals `area` (the model spectra's own scale);
    `post_edge`: divide by the mean in the post-edge window; `none`: leave as is."""
    if mode == "none":
        out = intensity
    elif mode == "area":
        total = intensity.sum()
        if total <= 0:
            raise XanesdiffInputError("spectrum has no positive area on the model grid", source)
        out = intensity * (area / total)
    elif mode == "post_edge":
        lo, hi = post_edge_eV
        mask = (grid.energies_eV >= lo) & (grid.energies_eV <= hi)
        level = intensity[mask].mean() if mask.any() else 0.0
        if level <= 0:
            raise XanesdiffInputError(f"post-edge window {lo}–{hi} eV has no positive intensity",
                                      source)
        out = intensity / level
    else:
        raise XanesdiffInputError(f"normalisation {mode!r}; expected 'area', 'post_edge' or 'none'")
    if (out < -0.05 * np.abs(out).max()).any():
        k = int(np.argmin(out))
        raise XanesdiffInputError(
            f"intensity {out[k]:.3g} at {grid.energies_eV[k]:.2f} eV is clearly negative after "
            "normalisation; check the pre-edge window or the background", source)
    return np.clip(out, 0.0, None)


def prepare_target(spectrum: MeasuredSpectrum, grid: EnergyGrid, *, shift_eV: float | None = None,
                   align_feature_eV: float | None = PI_STAR_eV,
                   feature_window_eV: tuple[float, float] | None = None,
                   pre_edge_eV: tuple[float, float] | None = None,
                   normalisation: str = "area", area: float | None = None,
                   post_edge_eV: tuple[float, float] | None = None) -> tuple[np.ndarray, float]:
    """Measured spectrum → target on the model grid. Returns (intensity on grid, applied shift eV).

    A given `shift_eV` wins; otherwise the most prominent peak in `feature_window_eV` (default
    ± 4 eV around it) is moved onto `align_feature_eV` (None: no shift).
    """
    if pre_edge_eV is not None:
        spectrum = subtract_pre_edge(spectrum, tuple(pre_edge_eV))
    if shift_eV is None:
        shift_eV = (0.0 if align_feature_eV is None
                    else feature_shift_eV(spectrum, align_feature_eV, feature_window_eV))
    on_grid = onto_grid(spectrum, grid, shift_eV)
    return normalise(on_grid, normalisation, grid, spectrum.source, area, post_edge_eV), shift_eV
