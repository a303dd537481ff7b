"""Device placement: `device=auto|cpu|cuda`, models and sampling state on one device, random
draws on the CPU generator (so a seed means the same on any device). The CUDA tests run only
where torch sees a GPU; the others check on the CPU what makes them hold there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance_toys import tiny_prior
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.diffusion.samplers import PredictorCorrector, gaussian_like
from xanesdiff.diffusion.sampling import sample_structures
from xanesdiff.runtime import lightning_trainer_options, resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_auto_picks_the_gpu_only_when_torch_sees_one_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(XanesdiffInputError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(XanesdiffInputError, match="device: .*'gpu0' is not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_training_reads_accelerator_auto_as_a_cuda_gpu_or_the_cpu(monkeypatch):
    options = {"accelerator": "auto", "devices": 1, "precision": 32}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lightning_trainer_options(options) == {**options, "accelerator": "cpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lightning_trainer_options(options)["accelerator"] == "gpu"
    assert lightning_trainer_options({"accelerator": "cpu"}) == {"accelerator": "cpu"}
    assert options["accelerator"] == "auto"  # the caller's mapping is left alone


def test_noise_is_drawn_by_the_cpu_generator_whatever_the_device_of_the_positions():
    """`gaussian_like` draws on the generator's device and moves the draw: a tensor on another
    device (here `meta`, which holds no data) advances the CPU generator exactly as a CPU draw
    does, so the following draws, and so the samples, are the same on any device."""
    on_cpu, elsewhere = (torch.Generator().manual_seed(7) for _ in range(2))
    cpu_noise = gaussian_like(torch.zeros(5, 3, dtype=torch.float64), on_cpu)
    meta_noise = gaussian_like(torch.empty(5, 3, device="meta"), elsewhere)
    assert meta_noise.device.type == "meta" and meta_noise.shape == (5, 3)
    assert cpu_noise.dtype == torch.float64
    assert torch.equal(torch.randn(4, generator=on_cpu), torch.randn(4, generator=elsewhere))
    assert torch.equal(cpu_noise,
                       torch.randn(5, 3, generator=torch.Generator().manual_seed(7),
                                   dtype=torch.float64))


def test_prior_runs_on_its_device_and_answers_in_the_callers_dtype():
    prior = tiny_prior(dtype=torch.float64)
    assert prior.device == torch.device("cpu")
    pos = torch.rand(20, 3, dtype=torch.float32) * 6.0
    cell = torch.eye(3) * 6.0
    score = prior.score(pos, cell, torch.full((20,), 6), 0.3)
    assert score.dtype == torch.float32 and score.device == pos.device
    assert torch.allclose(score.double(), prior.score(pos.double(), cell, [6] * 20, 0.3),
                          atol=1e-5)
    builds = prior.neighbors.n_builds
    assert prior.to("cpu") is prior  # moving drops the cached graph (it lives on the old device)
    prior.score(pos, cell, torch.full((20,), 6), 0.3)
    assert prior.neighbors.n_builds == builds + 1
    assert prior.to(torch.float32).dtype == torch.float32  # a bare dtype still casts


def test_guided_generator_refuses_a_prior_and_a_surrogate_on_two_devices():
    from xanesdiff.guidance.pipeline import GuidedGenerator

    class SurrogateElsewhere:
        device = torch.device("meta")

    with pytest.raises(ValueError, match="prior runs on cpu and the surrogate on meta"):
        GuidedGenerator(tiny_prior(), SurrogateElsewhere(), [])


@needs_cuda
def test_a_seed_samples_the_same_cell_on_the_gpu_as_on_the_cpu():
    prior = tiny_prior(dtype=torch.float64)
    sampler = PredictorCorrector(prior.schedule, n_steps=4, n_corrector=1, t_end=0.05)
    (on_cpu,) = sample_structures(prior, n_atoms=40, density_g_cm3=2.5, seed=3, sampler=sampler)
    (on_gpu,) = sample_structures(prior.to("cuda"), n_atoms=40, density_g_cm3=2.5, seed=3,
                                  sampler=sampler)
    prior.to("cpu")
    delta = on_cpu.positions - on_gpu.positions
    delta -= np.round(delta @ np.linalg.inv(on_cpu.cell.array)) @ on_cpu.cell.array
    assert np.abs(delta).max() < 1e-4


@needs_cuda
def test_shipped_models_guide_on_the_gpu_as_on_the_cpu():
    """One guided step of the shipped prior and the default (M3GNet) surrogate: same score."""
    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.guided_score import GuidedScore
    from xanesdiff.guidance.spectrum import SpectrumLikelihood

    cell = torch.eye(3) * 12.0
    pos = torch.rand(216, 3, generator=torch.Generator().manual_seed(0)) * 12.0
    numbers = torch.full((216,), 6)
    scores = []
    for device in ("cpu", "cuda"):
        prior = load_prior(device=device)
        surrogate = load_surrogate(device=device)
        term = SpectrumLikelihood(surrogate, np.full(surrogate.grid.n_points, 0.22))
        score = GuidedScore(prior, cell.to(device), numbers.to(device), [term])
        scores.append(score(pos.to(device), 0.3).cpu())
    assert torch.allclose(scores[0], scores[1], rtol=1e-3, atol=1e-3 * scores[0].abs().max())
