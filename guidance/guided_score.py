"""Prior score plus guidance, as one `score_fn(pos, t)` that any sampler accepts."""

from __future__ import annotations

import torch


class GuidedScore:
    """score(x_t) = prior score + J(x_t)ᵀ Σ_k g_k(x̂0), with x̂0 = x_t + σ(t)²·s(x_t) (DPS).

    g_k are the terms' contributions with respect to x̂0. With `through_denoiser` the sum is
    carried back to x_t by one vector–Jacobian product through the score model (exact DPS);
    without, J ≈ I (cheaper). `max_ratio` caps each term's RMS at that multiple of the prior
    score's RMS, per term, so a steep likelihood neither tears the network apart nor drowns the
    other terms (a steer next to a spectrum target keeps its share).

    `refresh_every` > 1 recomputes the guidance (surrogate and denoiser backward passes) only on
    every k-th guided call and reuses the last contribution in between: a cheaper, lagged
    guidance for consecutive steps whose positions barely move.

    `max_t` (None: off) cuts every term's time window at that diffusion time: no guidance,
    and no guidance cost, above it.
    """

    def __init__(self, prior, cell_A: torch.Tensor, numbers: torch.Tensor, terms: list,
                 through_denoiser: bool = True, max_ratio: float | None = 2.0,
                 refresh_every: int = 1, max_t: float | None = None):
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be ≥ 1, got {refresh_every}")
        if max_t is not None and not 0 < max_t <= 1:
            raise ValueError(f"max_t must lie in (0, 1] or be None, got {max_t}")
        self.prior, self.cell, self.numbers = prior, cell_A, numbers
        self.terms = list(terms)
        self.through_denoiser = through_denoiser
        self.max_ratio = max_ratio
        self.refresh_every = int(refresh_every)
        self.max_t = None if max_t is None else float(max_t)
        self.history: list[dict] = []
        self._guided_calls = 0
        self._last_contribution: torch.Tensor | None = None

    def __call__(self, pos_A: torch.Tensor, t: float) -> torch.Tensor:
        t = float(t)
        beyond_window = self.max_t is not None and t > self.max_t
        active = [] if beyond_window else [term for term in self.terms if term.schedule(t) > 0]
        if not active:
            with torch.no_grad():
                return self.prior.score(pos_A, self.cell, self.numbers, t)
        self._guided_calls += 1
        if self._last_contribution is not None and (self._guided_calls - 1) % self.refresh_every:
            with torch.no_grad():
                return (self.prior.score(pos_A, self.cell, self.numbers, t)
                        + self._last_contribution)
        sigma_sq = float(self.prior.schedule.sigma(t)) ** 2
        x_t = pos_A.detach().requires_grad_(self.through_denoiser)
        with torch.set_grad_enabled(self.through_denoiser):
            prior_score = self.prior.score(x_t, self.cell, self.numbers, t)
            x0 = x_t + sigma_sq * prior_score
        prior_rms = _rms(prior_score.detach()).clamp_min(1e-12)
        contribution = torch.zeros_like(pos_A)
        log = {"t": t}
        for term in active:
            g, term_log = term(x_t, x0.detach(), self.cell, self.numbers, t)
            ratio = float(_rms(g) / prior_rms)
            if self.max_ratio is not None and ratio > self.max_ratio:
                g = g * (self.max_ratio / ratio)
            contribution = contribution + g
            log.update({f"{term.name}/{k}": v for k, v in term_log.items()})
            log[f"{term.name}/to_prior_rms"] = ratio
        if self.through_denoiser:
            (contribution,) = torch.autograd.grad(x0, x_t, grad_outputs=contribution)
        log["guidance_to_prior_rms"] = float(_rms(contribution) / prior_rms)
        self.history.append(log)
        self._last_contribution = contribution.detach()
        return prior_score.detach() + self._last_contribution

    def denoised(self, pos_A: torch.Tensor, t: float) -> torch.Tensor:
        with torch.no_grad():
            return self.prior.denoise(pos_A, self.cell, self.numbers, t)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()
