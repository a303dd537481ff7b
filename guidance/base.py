"""The guidance-term interface and its time schedule.

A guidance term is a negative log-likelihood ("energy", dimensionless) of an observation given
a structure. It is evaluated on the prior's denoised estimate x̂0(x_t), never on the noisy x_t.
`GuidanceTerm.__call__` returns the term's score contribution with respect to x̂0 (−w(t)·∇E, in
1/Å) and a scalar for logging; `GuidedScore` carries the sum back to x_t through the denoiser.
A new term is one subclass implementing `energy` plus one YAML in `configs/guidance/`.

Observations of a cell average (its mean spectrum, its g(r)) pull on each atom with a force that
falls as 1/N. So that guidance means the same at every cell size, `__call__` multiplies the energy
by N_sites / `reference_atoms`: a cell of N sites counts as N / reference_atoms independent
observations of the target, each of a region the size the strengths were tuned on (216 atoms).
"""

from __future__ import annotations

import torch


class TimeWindow:
    """Guidance weight over diffusion time: `strength` for t in [t_min, t_max], ramping linearly
    to zero over `ramp` (in t) above t_max. Noise-level times t ∈ (0, 1]."""

    def __init__(self, strength: float = 1.0, t_min: float = 0.0, t_max: float = 1.0,
                 ramp: float = 0.0):
        if strength < 0 or not (0.0 <= t_min < t_max) or ramp < 0:
            raise ValueError(f"bad guidance schedule: strength={strength}, t_min={t_min}, "
                             f"t_max={t_max}, ramp={ramp}")
        self.strength, self.t_min, self.t_max, self.ramp = strength, t_min, t_max, ramp

    def __call__(self, t: float) -> float:
        if t < self.t_min:
            return 0.0
        if t <= self.t_max:
            return self.strength
        if self.ramp > 0 and t < self.t_max + self.ramp:
            return self.strength * (1.0 - (t - self.t_max) / self.ramp)
        return 0.0


class GuidanceTerm(torch.nn.Module):
    """Base class: subclasses implement `energy(x0, cell, numbers) -> (E, log dict)`."""

    name = "term"

    def __init__(self, schedule: TimeWindow | dict | None = None,
                 reference_atoms: int | None = 216):
        super().__init__()
        if isinstance(schedule, dict) or hasattr(schedule, "keys"):
            schedule = TimeWindow(**dict(schedule))
        if reference_atoms is not None and reference_atoms <= 0:
            raise ValueError(f"reference_atoms must be a positive site count or null, "
                             f"got {reference_atoms}")
        self.schedule = schedule or TimeWindow()
        self.reference_atoms = reference_atoms

    def observed_sites(self, numbers: torch.Tensor) -> float:
        """How many sites the observation averages over (all atoms unless a subclass says)."""
        return float(torch.as_tensor(numbers).numel())

    def size_factor(self, numbers: torch.Tensor) -> float:
        """N_sites / reference_atoms, the energy's multiplier (1 with `reference_atoms` null)."""
        if self.reference_atoms is None:
            return 1.0
        return self.observed_sites(numbers) / self.reference_atoms

    def energy(self, x0_A: torch.Tensor, cell_A: torch.Tensor, numbers: torch.Tensor
               ) -> tuple[torch.Tensor, dict]:
        """Negative log-likelihood (scalar tensor) of the observation given positions x0 (Å)."""
        raise NotImplementedError

    def __call__(self, x_t_A: torch.Tensor, x0_A: torch.Tensor, cell_A: torch.Tensor,
                 numbers: torch.Tensor, t: float) -> tuple[torch.Tensor, dict]:
        """Score contribution −w(t)·f·∇_{x̂0}E (N,3, 1/Å), f the size factor, and a log dict
        (energy, weight, size_factor)."""
        weight = self.schedule(t)
        if weight == 0.0:
            return torch.zeros_like(x0_A), {"weight": 0.0}
        x0 = x0_A.detach().requires_grad_(True)
        with torch.enable_grad():
            energy, log = self.energy(x0, cell_A, numbers)
            (grad,) = torch.autograd.grad(energy, x0)
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"guidance term {self.name!r} gave a non-finite gradient at "
                                     f"t={t:.4f} (energy {float(energy):.4g})")
        factor = self.size_factor(numbers)
        return -weight * factor * grad, {"energy": float(energy.detach()), "weight": weight,
                                         "size_factor": factor, **log}
