"""Guided generation of one cell, and density inference when the density is unknown.

    generator = GuidedGenerator(prior, surrogate, terms, sampler)
    atoms, log = generator.generate(density_g_cm3=2.5, seed=0)
    variant, log = generator.edit(start_atoms, noise_A=0.15, seed=0)  # a structure, re-noised
    best, scan = infer_density(generator, target_spectrum)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.graph import expected_neighbours, wrap_positions
from xanesdiff.datasets.structures import density_g_cm3 as density_of_atoms
from xanesdiff.diffusion.autoguidance import autoguidance_weight
from xanesdiff.diffusion.samplers import gaussian_like
from xanesdiff.diffusion.sampling import (default_sampler, density_of_cell,
                                          resolve_cell_and_count)
from xanesdiff.forward.surrogate import featurizer_parts
from xanesdiff.guidance.guided_score import GuidedScore
from xanesdiff.guidance.validation import predict_members, spectral_match
from xanesdiff.runtime import fit_kept_memory

SURROGATE_STEP_MB_PER_ATOM = {"descriptor": 0.05, "learned": 0.9, "learned_recomputed": 0.3}
"""The guidance surrogate's share of a guided step's working set (forward and backward), MB per
atom, without kept freed memory: histograms alone (`fast`, summed in recomputed blocks; peak
over the loaded process 0.046 at 3000 atoms, 0.039 at 10⁴, 0.019 at 10⁵; benchmarks/scale.json),
with learned (M3GNet, GNN) features (3000 atoms), or with M3GNet features recomputed span by
span in the backward pass (cells too large to keep their graph: a 10⁴-atom default-guided step
peaked at 5.8 GB with the kept heap this allows, 40 s, against 53 s with large blocks mapped
afresh when 0.9 was counted). The prior's share is its own `kept_mb`."""


def descriptor_only(surrogate) -> bool:
    """True for a surrogate on radial/angular histograms alone (cheap to differentiate)."""
    featurizer = getattr(surrogate, "config", {}).get("featurizer", {"type": "m3gnet"})
    return {part.get("type") for part in featurizer.get("parts", [featurizer])} == {"descriptor"}


def features_recomputed(surrogate, n_atoms: int, device=None) -> bool:
    """True when the surrogate's features recompute their intermediates in the backward pass
    over `n_atoms` atoms (M3GNet on cells too large to keep its graph)."""
    return any(part.recomputes(n_atoms, device) for part in featurizer_parts(surrogate)
               if hasattr(part, "recomputes"))


def guided_step_mb(surrogate, score_model, n_atoms: int, cell_A, device=None) -> float:
    """The working set of one guided step (MB): the surrogate's share plus what the prior keeps
    for its backward pass over the edges expected in this cell (uniform density)."""
    cell = torch.as_tensor(cell_A, dtype=torch.float64).detach().cpu().reshape(3, 3)
    volume_A3 = abs(float(torch.linalg.det(cell)))
    neighbours = expected_neighbours(n_atoms, volume_A3, score_model.cutoff_A)
    share = SURROGATE_STEP_MB_PER_ATOM[
        "descriptor" if descriptor_only(surrogate)
        else "learned_recomputed" if features_recomputed(surrogate, n_atoms, device)
        else "learned"]
    return n_atoms * share + score_model.kept_mb(int(n_atoms * neighbours), device)


class GuidedGenerator:
    """Samples one periodic cell at a time from the prior plus guidance terms."""

    def __init__(self, prior, surrogate, terms: list, sampler=None, n_atoms: int = 216,
                 element: str = "C", through_denoiser: bool = True,
                 max_ratio: float | None = 2.0, refresh_every: int | str = 1,
                 max_t: float | None = None):
        """`refresh_every`: guidance recomputed every k-th guided score call, or "step": once
        per sampler step (its predictor and corrector calls, at the cell's density)."""
        if refresh_every != "step" and not (isinstance(refresh_every, int)
                                            and refresh_every >= 1):
            raise ValueError(f"refresh_every must be a whole number ≥ 1 or 'step', "
                             f"got {refresh_every!r}")
        self.prior, self.surrogate, self.terms = prior, surrogate, list(terms)
        self.sampler = sampler or default_sampler(prior.schedule)
        self.n_atoms, self.element = n_atoms, element
        self.through_denoiser, self.max_ratio = through_denoiser, max_ratio
        self.refresh_every, self.max_t = refresh_every, max_t
        surrogate_device = getattr(surrogate, "device", None)
        if surrogate_device is not None and surrogate_device != prior.device:
            raise ValueError(f"the prior runs on {prior.device} and the surrogate on "
                             f"{surrogate_device}: load both on one device")

    def generate(self, density_g_cm3: float, seed: int, guided: bool = True,
                 cell_A=None) -> tuple[Atoms, dict]:
        """One structure at `density_g_cm3` (or in `cell_A`); `guided=False` samples the prior."""
        n, cell = resolve_cell_and_count(self.n_atoms if cell_A is None else None, density_g_cm3,
                                         cell_A, self.element)
        generator = torch.Generator().manual_seed(int(seed))  # on the CPU: same draws anywhere
        pos = self.prior.schedule.prior_sampling(n, torch.as_tensor(cell, dtype=self.prior.dtype),
                                                 generator, self.prior.dtype)
        atoms, log = self._sample(pos, cell, generator, guided, t_start=None)
        return atoms, {"seed": int(seed), "density_g_cm3": float(density_g_cm3 or 0.0), **log}

    def edit(self, start: Atoms, noise_A: float, seed: int, guided: bool = True,
             mobile=None) -> tuple[Atoms, dict]:
        """A variant of the structure `start` (its cell, atoms and density): its positions are
        noised to σ = `noise_A` (Å) and denoised again, with guidance when `guided`. A small σ
        (≈0.1 Å) keeps the network and adjusts its geometry; from ≈0.25 Å bonds rearrange.
        `mobile` (N,) bool: only these atoms move; the others stay exactly at their start
        positions, as clean context for the rest (default: all atoms move)."""
        t_start = self.start_time(noise_A)
        symbols = set(start.get_chemical_symbols())
        if symbols != {self.element}:
            raise XanesdiffInputError(f"the prior samples {self.element} only; the start "
                                      f"structure holds {sorted(symbols)}", "start")
        device, dtype, cell = self.prior.device, self.prior.dtype, start.cell.array
        cell_t = torch.as_tensor(cell, dtype=dtype, device=device)
        generator = torch.Generator().manual_seed(int(seed))
        start_pos = torch.as_tensor(start.positions, dtype=dtype, device=device)
        noise = gaussian_like(start_pos, generator)

        def wrap(x):
            return wrap_positions(x, cell_t)

        hold_fixed, n_mobile = wrap, len(start)
        if mobile is not None:
            moves = torch.as_tensor(np.asarray(mobile, dtype=bool), device=device).reshape(-1, 1)
            if moves.shape[0] != len(start) or not bool(moves.any()):
                raise XanesdiffInputError(f"mobile atoms: expected a mask of {len(start)} atoms "
                                          f"selecting at least one", "start_region")
            pinned, n_mobile = wrap(start_pos), int(moves.sum())

            def hold_fixed(x):  # the samplers' wrap: fixed atoms back to their start positions
                return wrap(torch.where(moves, x, pinned))

        pos = hold_fixed(start_pos + float(noise_A) * noise)
        atoms, log = self._sample(pos, cell, generator, guided, t_start=t_start, wrap_fn=hold_fixed)
        return atoms, {"seed": int(seed), "density_g_cm3": density_of_atoms(start),
                       "start_noise_A": float(noise_A), "mobile_atoms": n_mobile, **log}

    def start_time(self, noise_A: float) -> float:
        """The diffusion time whose noise is `noise_A` (Å), checked against the sampler's range."""
        schedule = self.prior.schedule
        t_start = float(schedule.t_of_sigma(float(noise_A)))
        if not (self.sampler.t_end < t_start <= self.sampler.t_start):
            lo, hi = (float(schedule.sigma(t)) for t in (self.sampler.t_end, self.sampler.t_start))
            raise XanesdiffInputError(f"{noise_A} Å is outside the sampler's noise range "
                                      f"({lo:.3g}, {hi:.3g}] Å", "start_noise_A")
        return t_start

    def _sample(self, pos, cell, generator, guided: bool, t_start: float | None,
                wrap_fn=None) -> tuple[Atoms, dict]:
        """Run the sampler on the prior's device from `pos` (moved there) in `cell` (3,3) Å."""
        device = self.prior.device
        pos = pos.to(device)
        n, cell_t = len(pos), torch.as_tensor(cell, dtype=self.prior.dtype, device=device)
        numbers = torch.full((n,), atomic_numbers[self.element], dtype=torch.long, device=device)
        terms = self.terms if guided else []
        if terms:
            fit_kept_memory(guided_step_mb(self.surrogate, self.prior.score_model, n, cell,
                                           device), device=device)
        density = density_of_cell(n, cell, self.element)
        refresh_every = (self.sampler.score_calls_per_step(density)
                         if self.refresh_every == "step" else int(self.refresh_every))
        score_fn = GuidedScore(self.prior, cell_t, numbers, terms, self.through_denoiser,
                               self.max_ratio, refresh_every, self.max_t)
        self.prior.neighbors.clear()
        pos = self.sampler.sample(pos, score_fn, wrap_fn or (lambda x: wrap_positions(x, cell_t)),
                                  generator, t_start=t_start, density_g_cm3=density)
        atoms = Atoms(numbers=numbers.cpu().numpy(), positions=pos.double().cpu().numpy(),
                      cell=cell, pbc=True)
        atoms.wrap()
        ratios = [h["guidance_to_prior_rms"] for h in score_fn.history]
        autoguidance = autoguidance_weight(self.prior.score_model, density)
        return atoms, {"guided": guided, "guided_steps": len(ratios),
                       **({} if autoguidance is None else {"autoguidance_weight": autoguidance}),
                       "max_guidance_to_prior_rms": max(ratios) if ratios else 0.0,
                       **{f"sampler_{name}": value for name, value in
                          self.sampler.settings_for(density).items() if value is not None}}


@dataclass
class DensitySearch:
    """Coarse grid, then a refinement around the best point, then a parabola through the three
    best densities. Each density is scored by the spectral MAE (surrogate prediction vs target)
    of `n_per_density` samples; `guided` chooses guided or prior-only samples for the scan."""

    coarse_g_cm3: tuple = (1.5, 2.0, 2.5, 3.0, 3.5)
    refine_step_g_cm3: float = 0.25
    n_per_density: int = 1
    guided: bool = False
    seed: int = 1000

    def score(self, generator: GuidedGenerator, target: np.ndarray, density: float) -> dict:
        maes = []
        for k in range(self.n_per_density):
            atoms, _ = generator.generate(density, self.seed + k, guided=self.guided)
            maes.append(spectral_match(predict_members(generator.surrogate, atoms).mean(0),
                                       target)["mae"])
        return {"density_g_cm3": float(density), "mae": float(np.mean(maes))}

    def run(self, generator: GuidedGenerator, target: np.ndarray, progress=None
            ) -> tuple[float, list[dict]]:
        lo, hi = min(self.coarse_g_cm3), max(self.coarse_g_cm3)
        scan = [{**self.score(generator, target, d), "stage": "coarse"} for d in
                _progress(self.coarse_g_cm3, progress, "density scan (coarse)")]
        best = min(scan, key=lambda s: s["mae"])["density_g_cm3"]
        refine = [d for d in (best - self.refine_step_g_cm3, best + self.refine_step_g_cm3)
                  if lo <= d <= hi]
        scan += [{**self.score(generator, target, d), "stage": "refined"} for d in
                 _progress(refine, progress, "density scan (refine)")]
        return _parabola_minimum(scan, lo, hi), scan


def _progress(items, progress, desc):
    if progress is None:
        return items
    return progress(items, desc=desc, leave=False)


def _parabola_minimum(scan: list[dict], lo: float, hi: float) -> float:
    """Vertex of the parabola through the best point and its nearest scanned neighbours;
    falls back to the best point when the three do not bracket a minimum."""
    points = sorted({s["density_g_cm3"]: s["mae"] for s in scan}.items())
    densities = np.array([p[0] for p in points])
    maes = np.array([p[1] for p in points])
    k = int(np.argmin(maes))
    if k == 0 or k == len(points) - 1:
        return float(densities[k])
    x, y = densities[k - 1:k + 2], maes[k - 1:k + 2]
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return float(densities[k])
    return float(np.clip(-b / (2 * a), x[0], x[2]))
