"""Spectral feature targets: intensity or area in an energy window, a ratio of two windows, or a
peak position, held equal to, above or below a value (absolute, or relative to a reference)."""

from __future__ import annotations

import torch

from xanesdiff.guidance.base import GuidanceTerm
from xanesdiff.guidance.spectrum import absorbing_sites

FEATURES = ("intensity", "area", "ratio", "peak_position")
RELATIONS = ("eq", "ge", "le")


class SpectralFeature(GuidanceTerm):
    """E = ½ (violation / tolerance)², violation = f − value ('eq'), min(f − value, 0) ('ge'),
    max(f − value, 0) ('le'). f is computed from the surrogate's ensemble-mean spectrum.

    `window_eV` (and `window2_eV` for a ratio, numerator over denominator) pick grid points;
    `intensity` is the mean, `area` the trapezoid integral (intensity·eV), `peak_position` a
    soft-argmax (eV, temperature `softness` in spectrum units). `value` is absolute; with
    `relative` set instead, the target is `relative × reference` and the reference comes from
    `set_reference` (e.g. the unguided structure's prediction). `tolerance` is in f's units, or,
    with `relative`, a fraction of the reference.
    """

    name = "feature"

    def __init__(self, feature: str = "intensity", window_eV=(284.0, 287.0), window2_eV=None,
                 relation: str = "eq", value: float | None = None, relative: float | None = None,
                 tolerance: float = 0.05, softness: float = 0.02, schedule=None, surrogate=None,
                 name: str | None = None, reference_atoms: int | None = 216):
        super().__init__(schedule, reference_atoms)
        if feature not in FEATURES:
            raise ValueError(f"feature {feature!r}; expected one of {FEATURES}")
        if relation not in RELATIONS:
            raise ValueError(f"relation {relation!r}; expected one of {RELATIONS}")
        if (value is None) == (relative is None):
            raise ValueError("give exactly one of value (absolute) or relative (× reference)")
        if feature == "ratio" and window2_eV is None:
            raise ValueError("a ratio feature needs window2_eV (the denominator window)")
        self.feature, self.relation = feature, relation
        self.window_eV = tuple(window_eV)
        self.window2_eV = tuple(window2_eV) if window2_eV is not None else None
        self.value, self.relative = value, relative
        self.tolerance, self.softness = float(tolerance), float(softness)
        self.reference: float | None = None
        self.surrogate = surrogate
        if name:
            self.name = name

    def bind(self, surrogate, target=None):
        self.surrogate = surrogate
        return self

    def set_reference(self, reference_spectrum: torch.Tensor) -> float:
        """Set the reference of a relative target from a spectrum on the surrogate's grid."""
        self.reference = float(self.measure(torch.as_tensor(reference_spectrum)))
        return self.reference

    @property
    def target_value(self) -> float:
        if self.relative is None:
            return float(self.value)
        if self.reference is None:
            raise RuntimeError(f"relative feature target {self.name!r} needs set_reference()")
        return self.relative * self.reference

    def _mask(self, window_eV, energies):
        mask = (energies >= window_eV[0]) & (energies <= window_eV[1])
        if int(mask.sum()) < 2:
            raise ValueError(f"window {window_eV} eV holds {int(mask.sum())} grid points; need ≥ 2 "
                             f"(grid {float(energies[0]):.1f}–{float(energies[-1]):.1f} eV)")
        return mask

    def measure(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The feature of a spectrum (M,) on the surrogate's grid, differentiable."""
        energies = torch.as_tensor(self.surrogate.grid.energies_eV, dtype=spectrum.dtype,
                                   device=spectrum.device)
        mask = self._mask(self.window_eV, energies)
        if self.feature == "intensity":
            return spectrum[mask].mean()
        if self.feature == "area":
            return torch.trapezoid(spectrum[mask], energies[mask])
        if self.feature == "ratio":
            mask2 = self._mask(self.window2_eV, energies)
            return spectrum[mask].mean() / spectrum[mask2].mean().clamp_min(1e-8)
        weights = torch.softmax(spectrum[mask] / self.softness, dim=0)
        return (weights * energies[mask]).sum()

    def observed_sites(self, numbers):
        return absorbing_sites(self.surrogate, numbers)

    def energy(self, x0_A, cell_A, numbers):
        spectrum = self.surrogate.mean_spectrum(x0_A, cell_A, numbers).mean(0)
        value = self.measure(spectrum)
        target = self.target_value
        violation = value - target
        if self.relation == "ge":
            violation = violation.clamp(max=0.0)
        elif self.relation == "le":
            violation = violation.clamp(min=0.0)
        scale = self.tolerance * (abs(self.reference) if self.relative is not None else 1.0)
        return 0.5 * (violation / scale) ** 2, {"value": float(value.detach()), "target": target}
