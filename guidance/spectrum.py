"""Spectrum likelihood: the surrogate's mean spectrum of x̂0 against a target spectrum."""

from __future__ import annotations

import numpy as np
import torch

from xanesdiff.guidance.base import GuidanceTerm


class SpectrumLikelihood(GuidanceTerm):
    """E = ½ Σ_E (S̄(x̂0) − y)² / (σ_obs² + γ·Var_k S_k(x̂0)), a Gaussian likelihood per energy point.

    S̄ is the ensemble mean of the surrogate's mean-over-sites spectrum, Var_k its spread over
    ensemble members (noise-aware: points where the surrogate is unsure pull less). `sigma_obs`
    is the target's own noise (spectrum units); `site_mask` restricts the mean to chosen sites.
    `heldout_weight` w > 0 adds w·rms² to the denominator, rms the guide's measured held-out error
    per energy (`surrogate.heldout_error`): points where it errs on new networks pull less.
    The energy is weighted by (absorbing sites) / `reference_atoms` (see `GuidanceTerm`).
    """

    name = "spectrum"

    def __init__(self, surrogate=None, target=None, sigma_obs: float = 0.01,
                 ensemble_weight: float = 1.0, schedule=None, site_mask=None,
                 reference_atoms: int | None = 216, heldout_weight: float = 0.0):
        super().__init__(schedule, reference_atoms)
        self.surrogate = surrogate
        self.sigma_obs = float(sigma_obs)
        self.ensemble_weight = float(ensemble_weight)
        self.heldout_weight = float(heldout_weight)
        self.site_mask = site_mask
        self.target = None if target is None else torch.as_tensor(np.asarray(target),
                                                                  dtype=torch.float32)

    def bind(self, surrogate, target=None):
        """Attach the surrogate and target when they are only known at run time."""
        self.surrogate = surrogate
        if target is not None:
            self.target = torch.as_tensor(np.asarray(target), dtype=torch.float32)
        return self

    def observed_sites(self, numbers):
        return absorbing_sites(self.surrogate, numbers, self.site_mask)

    def _heldout_variance(self) -> torch.Tensor:
        error = getattr(self.surrogate, "heldout_error", None)
        if error is None:
            raise RuntimeError("heldout_weight > 0 needs a guide whose held-out error is measured "
                               "(python -m xanesdiff.scripts.calibrate_forward --checkpoint …)")
        return torch.as_tensor(error.rms ** 2)

    def energy(self, x0_A, cell_A, numbers):
        if self.surrogate is None or self.target is None:
            raise RuntimeError("SpectrumLikelihood needs bind(surrogate, target) before sampling")
        members = self.surrogate.mean_spectrum(x0_A, cell_A, numbers, site_mask=self.site_mask)
        target = self.target.to(members)  # the prediction's device and dtype
        mean = members.mean(0)
        var = members.var(0, unbiased=False) if members.shape[0] > 1 else torch.zeros_like(mean)
        variance = self.sigma_obs ** 2 + self.ensemble_weight * var.detach()
        if self.heldout_weight:
            variance = variance + self.heldout_weight * self._heldout_variance().to(variance)
        energy = 0.5 * ((mean - target) ** 2 / variance).sum()
        return energy, {"mae": float((mean - target).abs().mean().detach())}


def absorbing_sites(surrogate, numbers: torch.Tensor, site_mask=None) -> float:
    """Sites a mean spectrum averages over: the mask's total weight, else the absorbers."""
    if site_mask is not None:
        return float(torch.as_tensor(site_mask).to(torch.float64).sum())
    if hasattr(surrogate, "absorber_mask"):
        return float(surrogate.absorber_mask(numbers).sum())
    return float(torch.as_tensor(numbers).numel())
