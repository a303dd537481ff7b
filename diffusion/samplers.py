"""Reverse-time samplers, each built from a noise schedule and given a score function.

A sampler knows nothing of graphs or models: `sample(pos, score_fn, wrap_fn, generator)` takes
initial positions (N,3) Å, `score_fn(pos, t) -> (N,3)` 1/Å (a plain callable, so guidance can add
to it), and `wrap_fn(pos) -> pos` that maps positions back into their cells. Every step is checked
for non-finite positions. Vectorised over atoms (and cells, when the score function is batched).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

ScoreFn = Callable[[torch.Tensor, float], torch.Tensor]
WrapFn = Callable[[torch.Tensor], torch.Tensor]


def gaussian_like(pos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like `pos`, on its device and dtype, drawn with `generator`
    on the generator's own device (the CPU for `torch.Generator()`): a seed then gives the same
    noise, and so the same sample, whether the model runs on the CPU or a GPU."""
    where = generator.device if generator is not None else pos.device
    noise = torch.randn(pos.shape, generator=generator, dtype=pos.dtype, device=where)
    return noise.to(pos.device)


class IncompatibleSampler(ValueError):
    """A sampler used with a noise process it does not support."""


class NonFiniteSampleError(FloatingPointError):
    """Positions became NaN/inf during sampling; the message names the step and time."""


def _check_finite(pos: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(pos).all()):
        n_bad = int((~torch.isfinite(pos)).any(-1).sum())
        raise NonFiniteSampleError(
            f"non-finite positions for {n_bad} atoms at {where}; lower the guidance strength or "
            "use more steps")


@dataclass(frozen=True)
class DensityCooling:
    """Colder sampling for denser cells. At or below `from_g_cm3` a sampler keeps its own noise
    scales; at or above `to_g_cm3` every step runs at `noise_scale` (√temperature); linear in
    the density in between. It only ever cools: a scale already below the dense one is kept."""

    from_g_cm3: float = 3.0
    to_g_cm3: float = 3.5
    noise_scale: float = 0.2

    def __post_init__(self):
        if not self.from_g_cm3 < self.to_g_cm3 or self.noise_scale < 0:
            raise ValueError(f"density cooling needs from_g_cm3 < to_g_cm3 and noise_scale ≥ 0 "
                             f"(got {self.from_g_cm3}, {self.to_g_cm3}, {self.noise_scale})")

    def scale(self, own: float, density_g_cm3: float) -> float:
        """The noise scale that replaces `own` in a cell of `density_g_cm3` (g/cm³)."""
        share = (density_g_cm3 - self.from_g_cm3) / (self.to_g_cm3 - self.from_g_cm3)
        share = min(max(share, 0.0), 1.0)
        return min(own, (1 - share) * own + share * self.noise_scale)


@dataclass(frozen=True)
class DenseCellSteps:
    """More steps for denser cells: in a cell at or above `from_g_cm3` (g/cm³) every step count
    of a sampler (its predictor steps, the corrector steps after each, restart steps), or only
    those named in `counts` (e.g. `["n_corrector"]`), is multiplied by `factor`, so a denser
    network, slower to equilibrate, gets a longer run. A partial run (from a partly noised
    structure) is multiplied alike."""

    from_g_cm3: float = 3.3
    factor: int = 2
    counts: tuple[str, ...] | None = None

    KNOWN_COUNTS = ("n_steps", "n_corrector", "n_restart_steps")

    def __post_init__(self):
        if int(self.factor) != self.factor or self.factor < 1 or self.from_g_cm3 <= 0:
            raise ValueError(f"dense-cell steps need a whole factor ≥ 1 and from_g_cm3 > 0 "
                             f"(got factor {self.factor}, from_g_cm3 {self.from_g_cm3})")
        if self.counts is not None:
            object.__setattr__(self, "counts", tuple(self.counts))
            unknown = [name for name in self.counts if name not in self.KNOWN_COUNTS]
            if unknown or not self.counts:
                raise ValueError(f"dense-cell steps: counts must name some of "
                                 f"{list(self.KNOWN_COUNTS)}, got {list(self.counts)}")

    def multiplies(self, name: str) -> bool:
        """Whether the step count `name` (e.g. "n_corrector") is multiplied in dense cells."""
        return self.counts is None or name in self.counts

    def count(self, own: int, density_g_cm3: float) -> int:
        """The step count that replaces `own` in a cell of `density_g_cm3` (g/cm³)."""
        return own * int(self.factor) if density_g_cm3 >= self.from_g_cm3 else own


class Sampler:
    """Base: a time grid from `t_start` to `t_end` (uniform in t^(1/grid_power): grid_power > 1
    puts more steps at small noise), optional final Langevin corrector steps at `t_end` and a
    final Tweedie denoising step x ← x + σ(t_end)² s(x, t_end). `noise_scale` multiplies the noise
    of the reverse-SDE steps and of the Langevin corrector: a temperature T = noise_scale², below 1
    the sampler aims at ≈ p^(1/T), sharper and less diverse samples (a Gaussian's variance shrinks
    by T). With `low_noise_t` set, steps at t ≤ low_noise_t (and the final correctors) use
    `low_noise_scale` instead: a colder end for the local structure. With `density_cooling` (a
    `DensityCooling`), `sample(..., density_g_cm3=ρ)` runs with the noise scales it gives at ρ;
    with `dense_steps` (a `DenseCellSteps`), with the step counts it gives at ρ."""

    name = "base"
    step_counts = ("n_steps",)  # the attributes `dense_steps` multiplies

    def __init__(self, schedule, n_steps: int = 100, t_start: float = 1.0, t_end: float = 0.01,
                 final_corrector_steps: int = 0, corrector_snr: float = 0.1,
                 final_denoise: bool = True, grid_power: float = 1.0, noise_scale: float = 1.0,
                 low_noise_scale: float | None = None, low_noise_t: float | None = None,
                 density_cooling: DensityCooling | None = None,
                 dense_steps: DenseCellSteps | None = None):
        if not hasattr(schedule, "diffusion_coeff_sq") or not hasattr(schedule, "sigma"):
            raise IncompatibleSampler(f"{type(self).__name__} needs a schedule with sigma(t) and "
                                      f"diffusion_coeff_sq(t), got {type(schedule).__name__}")
        if not (0 < t_end < t_start) or n_steps < 1:
            raise ValueError(f"need 0 < t_end < t_start and n_steps ≥ 1 (got {t_end}, {t_start}, "
                             f"{n_steps})")
        self.schedule = schedule
        self.n_steps, self.t_start, self.t_end = int(n_steps), float(t_start), float(t_end)
        self.final_corrector_steps = int(final_corrector_steps)
        self.corrector_snr = float(corrector_snr)
        self.final_denoise = bool(final_denoise)
        self.grid_power = float(grid_power)
        if noise_scale < 0 or (low_noise_scale is not None and low_noise_scale < 0):
            raise ValueError(f"noise scales must be ≥ 0 (got {noise_scale}, {low_noise_scale})")
        if (low_noise_scale is None) != (low_noise_t is None):
            raise ValueError("give low_noise_scale and low_noise_t together (or neither)")
        self.noise_scale = float(noise_scale)
        self.low_noise_scale = None if low_noise_scale is None else float(low_noise_scale)
        self.low_noise_t = None if low_noise_t is None else float(low_noise_t)
        self.density_cooling = density_cooling
        self.dense_steps = dense_steps
        self.n_score_evals = 0

    def time_grid(self, t_start: float | None = None, t_end: float | None = None,
                  n_steps: int | None = None) -> list[float]:
        t_start = self.t_start if t_start is None else t_start
        t_end = self.t_end if t_end is None else t_end
        n = self.n_steps if n_steps is None else n_steps
        p = self.grid_power
        u = torch.linspace(t_start ** (1 / p), t_end ** (1 / p), n + 1, dtype=torch.float64)
        return (u ** p).tolist()

    def _score(self, score_fn, pos, t):
        self.n_score_evals += 1
        return score_fn(pos, t)

    def noise_scale_at(self, t: float) -> float:
        """The noise scale (√temperature) of steps at time t."""
        if self.low_noise_t is not None and t <= self.low_noise_t:
            return self.low_noise_scale
        return self.noise_scale

    def noise_scales_for(self, density_g_cm3: float | None) -> dict:
        """The noise scales a run in a cell of `density_g_cm3` (g/cm³) uses (None: its own)."""
        scales = {"noise_scale": self.noise_scale, "low_noise_scale": self.low_noise_scale}
        if self.density_cooling is None or density_g_cm3 is None:
            return scales
        return {name: None if own is None else self.density_cooling.scale(own, density_g_cm3)
                for name, own in scales.items()}

    def steps_for(self, density_g_cm3: float | None) -> dict:
        """The step counts a run in a cell of `density_g_cm3` (g/cm³) uses (None: its own)."""
        own = {name: getattr(self, name) for name in self.step_counts}
        if self.dense_steps is None or density_g_cm3 is None:
            return own
        return {name: self.dense_steps.count(n, density_g_cm3)
                if self.dense_steps.multiplies(name) else n for name, n in own.items()}

    def score_calls_per_step(self, density_g_cm3: float | None = None) -> int:
        """Score calls of one step of the main run in a cell of `density_g_cm3` (None: the
        sampler's own counts): what "once per step" means to a guidance refresh."""
        return 1

    def settings_for(self, density_g_cm3: float | None) -> dict:
        """Noise scales and step counts of a run in a cell of `density_g_cm3` (None: its own)."""
        return {**self.noise_scales_for(density_g_cm3), **self.steps_for(density_g_cm3)}

    @contextmanager
    def adapted_for(self, density_g_cm3: float | None):
        """Within the block the sampler runs with the settings of `settings_for`; its own are
        back afterwards, also after an error."""
        def set_all(settings):
            for name, value in settings.items():
                setattr(self, name, value)

        own = self.settings_for(None)
        set_all(self.settings_for(density_g_cm3))
        try:
            yield
        finally:
            set_all(own)

    # --- building blocks ---------------------------------------------------------------------
    def em_step(self, pos, score_fn, wrap_fn, t, t_next, generator, add_noise=True):
        """One Euler–Maruyama step of the reverse SDE dx = [f − g² s] dt + g dW̄ from t to t_next."""
        dt = t - t_next
        g2 = self.schedule.diffusion_coeff_sq(t)
        score = self._score(score_fn, pos, t)
        pos = pos - self.schedule.drift(pos, t) * dt + g2 * dt * score
        if add_noise:
            pos = pos + self.noise_scale_at(t) * (g2 * dt) ** 0.5 * gaussian_like(pos, generator)
        return wrap_fn(pos)

    def langevin_step(self, pos, score_fn, wrap_fn, t, generator):
        """Langevin corrector x ← x + ε s + √(2ε) · noise scale · z with the signal-to-noise
        step rule of score_sde, ε = 2 (snr |z| / |s|)², capped at σ(t)² (Å²): the drift then
        never goes past the Tweedie denoised estimate x + σ² s, which keeps the step bounded
        where the score is nearly zero (the rule alone would diverge there, most readily at
        low temperature, whose smaller noise lets the walker settle on such points)."""
        score = self._score(score_fn, pos, t)
        z = gaussian_like(pos, generator)
        step = 2 * (self.corrector_snr * z.norm() / score.norm().clamp_min(1e-12)) ** 2
        step = torch.clamp(step, max=self.schedule.sigma(t) ** 2)
        return wrap_fn(pos + step * score + self.noise_scale_at(t) * (2 * step) ** 0.5 * z)

    def finish(self, pos, score_fn, wrap_fn, generator):
        for k in range(self.final_corrector_steps):
            pos = self.langevin_step(pos, score_fn, wrap_fn, self.t_end, generator)
            _check_finite(pos, f"final corrector step {k}")
        if self.final_denoise:
            sigma = self.schedule.sigma(self.t_end)
            pos = wrap_fn(pos + sigma ** 2 * self._score(score_fn, pos, self.t_end))
            _check_finite(pos, "final denoising step")
        return pos

    def run(self, pos, score_fn, wrap_fn, generator, t_start=None, n_steps=None):
        raise NotImplementedError

    def steps_from(self, t_start: float) -> int:
        """Steps for a run from `t_start` (≤ the sampler's own) at the full run's step density
        on its grid, so a partial run spends its calls where a full one would."""
        if not (self.t_end < t_start <= self.t_start):
            raise ValueError(f"a run can start at t in ({self.t_end}, {self.t_start}], "
                             f"got {t_start}")
        p = self.grid_power
        share = ((t_start ** (1 / p) - self.t_end ** (1 / p))
                 / (self.t_start ** (1 / p) - self.t_end ** (1 / p)))
        return max(1, round(self.n_steps * share))

    def sample(self, pos: torch.Tensor, score_fn: ScoreFn, wrap_fn: WrapFn,
               generator: torch.Generator | None = None, t_start: float | None = None,
               density_g_cm3: float | None = None) -> torch.Tensor:
        """Integrate from `t_start` to `t_end` starting at `pos`, then finish (corrector, denoise).
        `density_g_cm3`, the cells' density, sets the noise scales when the sampler has a
        `density_cooling`, and the step counts when it has `dense_steps`.

        `t_start` below the sampler's own starts from a partly noised structure (positions
        already at noise level σ(t_start)); the run then takes `steps_from(t_start)` steps.
        Runs under `torch.no_grad()`; a score function that needs gradients (guidance) enables
        them itself (`with torch.enable_grad(): ...`)."""
        _check_finite(pos, "the initial state")
        with torch.no_grad(), self.adapted_for(density_g_cm3):
            n_steps = None if t_start is None else self.steps_from(float(t_start))
            pos = self.run(pos.detach(), score_fn, wrap_fn, generator, t_start, n_steps)
            return self.finish(pos, score_fn, wrap_fn, generator)


class EulerMaruyama(Sampler):
    """Euler–Maruyama integration of the reverse-time SDE (noise on every step but the last)."""

    name = "em"

    def run(self, pos, score_fn, wrap_fn, generator, t_start=None, n_steps=None):
        grid = self.time_grid(t_start, None, n_steps)
        for k, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            pos = self.em_step(pos, score_fn, wrap_fn, t, t_next, generator,
                               add_noise=k < len(grid) - 2)
            _check_finite(pos, f"step {k} (t={t:.4f})")
        return pos


class PredictorCorrector(EulerMaruyama):
    """EM predictor followed by `n_corrector` Langevin corrector steps at each new time."""

    name = "pc"
    step_counts = ("n_steps", "n_corrector")

    def __init__(self, schedule, n_corrector: int = 1, **kwargs):
        super().__init__(schedule, **kwargs)
        self.n_corrector = int(n_corrector)

    def score_calls_per_step(self, density_g_cm3: float | None = None) -> int:
        return 1 + self.steps_for(density_g_cm3)["n_corrector"]

    def run(self, pos, score_fn, wrap_fn, generator, t_start=None, n_steps=None):
        grid = self.time_grid(t_start, None, n_steps)
        for k, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            pos = self.em_step(pos, score_fn, wrap_fn, t, t_next, generator)
            for _ in range(self.n_corrector):
                pos = self.langevin_step(pos, score_fn, wrap_fn, t_next, generator)
            _check_finite(pos, f"step {k} (t={t:.4f})")
        return pos


class ProbabilityFlow(Sampler):
    """Heun (2nd order) integration of the probability-flow ODE dx/dt = f − ½ g² s."""

    name = "ode"

    def score_calls_per_step(self, density_g_cm3: float | None = None) -> int:
        return 2  # Heun: the step's start and its trial end

    def run(self, pos, score_fn, wrap_fn, generator, t_start=None, n_steps=None):
        grid = self.time_grid(t_start, None, n_steps)

        def velocity(x, t):  # dx/d(−t)
            return 0.5 * self.schedule.diffusion_coeff_sq(t) * self._score(score_fn, x, t)

        for k, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            dt = t - t_next
            v1 = velocity(pos, t)
            trial = pos + dt * v1
            v2 = velocity(trial, t_next)
            pos = wrap_fn(pos + 0.5 * dt * (v1 + v2))
            _check_finite(pos, f"step {k} (t={t:.4f})")
        return pos


class RestartSampler(Sampler):
    """Restart sampling (Xu et al. 2023): a base run to `t_end`, then `n_restarts` rounds of
    re-noising to `t_restart` (adding the missing variance σ(t_restart)² − σ(t_end)²) and
    integrating back down with `n_restart_steps` steps of the base sampler."""

    name = "restart"
    step_counts = ("n_steps", "n_restart_steps")

    def __init__(self, schedule, base: Sampler | None = None, n_restarts: int = 2,
                 t_restart: float = 0.3, n_restart_steps: int = 30, **kwargs):
        super().__init__(schedule, **kwargs)
        self.base = base or EulerMaruyama(
            schedule, n_steps=self.n_steps, t_start=self.t_start, t_end=self.t_end,
            final_denoise=False, noise_scale=self.noise_scale,
            low_noise_scale=self.low_noise_scale, low_noise_t=self.low_noise_t,
            density_cooling=self.density_cooling, dense_steps=self.dense_steps)
        if abs(self.base.t_end - self.t_end) > 1e-12:
            raise ValueError("base sampler and restart sampler must end at the same t_end")
        if not (self.t_end < t_restart <= self.t_start):
            raise ValueError(f"t_restart={t_restart} must lie in (t_end, t_start]")
        self.n_restarts, self.t_restart = int(n_restarts), float(t_restart)
        self.n_restart_steps = int(n_restart_steps)

    @contextmanager
    def adapted_for(self, density_g_cm3: float | None):
        with super().adapted_for(density_g_cm3), self.base.adapted_for(density_g_cm3):
            yield

    def _score(self, score_fn, pos, t):  # count evaluations made by the base sampler too
        self.n_score_evals += 1
        return score_fn(pos, t)

    def steps_from(self, t_start: float) -> int:
        super().steps_from(t_start)  # checks the range
        return self.base.steps_from(min(float(t_start), self.base.t_start))

    def run(self, pos, score_fn, wrap_fn, generator, t_start=None, n_steps=None):
        counted = lambda x, t: self._score(score_fn, x, t)  # noqa: E731
        pos = self.base.run(pos, counted, wrap_fn, generator, t_start, n_steps)
        # a run started below t_restart (a partly noised structure) never re-noises above it
        t_restart = self.t_restart if t_start is None else min(self.t_restart, float(t_start))
        n_restart_steps = self.n_restart_steps
        if t_restart < self.t_restart:
            n_restart_steps = max(1, round(self.n_restart_steps * (t_restart - self.t_end)
                                           / (self.t_restart - self.t_end)))
        extra_sd = (self.schedule.sigma(t_restart) ** 2
                    - self.schedule.sigma(self.t_end) ** 2) ** 0.5
        for r in range(self.n_restarts):
            pos = wrap_fn(pos + extra_sd * gaussian_like(pos, generator))
            pos = self.base.run(pos, counted, wrap_fn, generator, t_restart, n_restart_steps)
            _check_finite(pos, f"restart round {r}")
        return pos


SAMPLERS = {c.name: c for c in (EulerMaruyama, PredictorCorrector, ProbabilityFlow, RestartSampler)}
