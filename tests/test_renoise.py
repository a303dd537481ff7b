"""The prior's re-noising diagnostic: a perfect score model gives the structure back."""

from types import SimpleNamespace

import pytest
import torch
from ase.build import bulk

from xanesdiff.analysis.structure import hybridization_fractions
from xanesdiff.datasets.graph import minimum_image
from xanesdiff.diffusion.sampling import default_sampler
from xanesdiff.diffusion.schedule import VESchedule
from xanesdiff.scripts.benchmark_renoise import renoise


def exact_prior_of(frames):
    """A 'prior' whose data distribution is exactly these frames: score = −(x − x0)/σ²."""
    schedule = VESchedule(sigma_per_t_A=0.8)
    x0 = torch.cat([torch.as_tensor(a.positions) for a in frames])

    def score_batch(x, cells, numbers, t, batch):
        return -minimum_image(x - x0, cells, batch) / float(schedule.sigma(t)) ** 2

    return SimpleNamespace(schedule=schedule, dtype=torch.float64, score_batch=score_batch,
                           neighbors=SimpleNamespace(clear=lambda: None))


@pytest.mark.parametrize("t", [0.15, 0.5])
def test_an_exact_score_returns_each_frame_to_its_structure(t):
    frames = [bulk("C", "diamond", a=3.567, cubic=True).repeat(2),
              bulk("C", "diamond", a=3.567, cubic=True).repeat((2, 2, 3))]
    prior = exact_prior_of(frames)
    sampler = default_sampler(prior.schedule)
    sampler.t_start = t
    out = renoise(prior, frames, t, sampler, seed=0)
    assert [len(a) for a in out] == [len(a) for a in frames]
    for before, after in zip(frames, out):
        assert (after.cell.array == before.cell.array).all()
        assert hybridization_fractions(after)["sp3"] == 1.0
    # without the score the same noise breaks the diamond network
    blind = exact_prior_of(frames)
    blind.score_batch = lambda x, cells, numbers, t, batch: torch.zeros_like(x)
    broken = renoise(blind, frames, t, sampler, seed=0)
    assert hybridization_fractions(broken)["sp3"] < 0.9
