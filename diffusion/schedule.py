"""Noise processes on Cartesian positions in a periodic cell (score_sde / mattergen style).

A process is a small object with plain-tensor methods: `sigma(t)` (Å), `marginal_sample`
(forward noising with periodic wrapping), `prior_sampling` (uniform positions in the cell),
`diffusion_coeff_sq(t)` (g(t)², Å²) for the reverse SDE, and `drift(x, t)` (zero for VE).
"""

from __future__ import annotations

import torch

from xanesdiff.datasets.graph import minimum_image, wrap_positions


class VESchedule:
    """Variance-exploding process with linear noise, σ(t) = k·t (Å), t ∈ (0, 1].

    x_t = wrap(x_0 + σ(t)·ε); g(t)² = dσ²/dt = 2k²t. As in arXiv:2312.05472 with k ≈ 0.8 Å.
    The prior at t = 1 is taken as uniform positions in the cell (what the sampler starts from);
    training may use t beyond 1 (`t_max_train` in the training config) so the score model has seen
    configurations as disordered as uniform ones.
    """

    name = "ve_linear"

    def __init__(self, sigma_per_t_A: float = 0.8, t_min: float = 1e-3, t_max: float = 1.0):
        if sigma_per_t_A <= 0 or not (0 < t_min < t_max):
            raise ValueError(f"need sigma_per_t_A > 0 and 0 < t_min < t_max, got "
                             f"{sigma_per_t_A}, {t_min}, {t_max}")
        self.sigma_per_t_A = float(sigma_per_t_A)
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    def config(self) -> dict:
        return {"_target_": f"{type(self).__module__}.{type(self).__name__}",
                "sigma_per_t_A": self.sigma_per_t_A, "t_min": self.t_min, "t_max": self.t_max}

    def sigma(self, t):
        """Noise standard deviation σ(t) in Å (per coordinate)."""
        return self.sigma_per_t_A * t

    def t_of_sigma(self, sigma_A):
        return sigma_A / self.sigma_per_t_A

    def diffusion_coeff_sq(self, t):
        """g(t)² = d σ(t)²/dt (Å² per unit t)."""
        return 2.0 * self.sigma_per_t_A ** 2 * t

    def drift(self, pos_A: torch.Tensor, t) -> torch.Tensor:
        """Forward SDE drift f(x, t): zero for a VE process."""
        return torch.zeros_like(pos_A)

    def marginal_sample(self, pos0_A: torch.Tensor, cell_A: torch.Tensor, t: torch.Tensor,
                        batch: torch.Tensor | None = None, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x_t ~ p(x_t | x_0) with periodic wrapping.

        `t` is per atom (N,) or a scalar. Returns (x_t wrapped into the cell, minimum-image
        displacement x_t − x_0 in Å), the latter being the regression target of the loss.
        """
        t = torch.as_tensor(t, dtype=pos0_A.dtype, device=pos0_A.device)
        sigma = self.sigma(t).reshape(-1, 1) if t.ndim else self.sigma(t)
        noise = torch.randn(pos0_A.shape, generator=generator, dtype=pos0_A.dtype,
                            device=pos0_A.device)
        pos_t = wrap_positions(pos0_A + sigma * noise, cell_A, batch)
        return pos_t, minimum_image(pos_t - pos0_A, cell_A, batch)

    def prior_sampling(self, n_atoms: int, cell_A: torch.Tensor,
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform random positions (Å) in the cell: the sampler's initial state."""
        cell = torch.as_tensor(cell_A, dtype=dtype).reshape(3, 3)
        frac = torch.rand((n_atoms, 3), generator=generator, dtype=dtype)
        return frac @ cell


SCHEDULES = {VESchedule.name: VESchedule}


def schedule_from_config(config: dict):
    """Rebuild a schedule from `schedule.config()` (checkpoints store this)."""
    config = dict(config)
    target = config.pop("_target_", None)
    cls = next((c for c in SCHEDULES.values() if target and target.endswith(c.__name__)), None)
    if cls is None:
        raise ValueError(f"unknown schedule {target!r}; known: {sorted(SCHEDULES)}")
    return cls(**config)
