"""Autoguidance: the prior's score pushed away from a weaker prior's."""

import numpy as np
import pytest
import torch
from e3nn import o3

from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.diffusion.autoguidance import (Autoguidance, AutoguidedScoreModel,
                                              autoguidance_weight)
from xanesdiff.diffusion.prior import load_prior, save_prior
from xanesdiff.diffusion.samplers import EulerMaruyama
from xanesdiff.diffusion.schedule import VESchedule
from xanesdiff.diffusion.score_model import EquivariantScoreModel


def tiny_model(seed: int, cutoff_A: float = 3.0) -> EquivariantScoreModel:
    torch.manual_seed(seed)
    return EquivariantScoreModel(cutoff_A=cutoff_A, irreps_hidden="8x0e + 4x1o", n_layers=2,
                                 lmax=1, radial_hidden=8, n_basis=4, n_noise_features=8).double()


def random_cell(n_atoms: int = 24, edge_A: float = 6.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cell = torch.eye(3, dtype=torch.float64) * edge_A
    pos = torch.rand(n_atoms, 3, generator=g, dtype=torch.float64) * edge_A
    return pos, cell, torch.full((n_atoms,), 6, dtype=torch.long)


def score_of(model, pos, cell, numbers, sigma=0.3):
    from xanesdiff.diffusion.neighbors import NeighborListCache

    batch = torch.zeros(len(pos), dtype=torch.long)
    edge_index, edge_shift = NeighborListCache(model.cutoff_A, 0.0).get(pos, cell[None], batch)
    return model(pos, cell[None], numbers, torch.tensor(sigma, dtype=pos.dtype), edge_index,
                 edge_shift, batch)


def test_autoguided_score_extrapolates_away_from_the_weaker_model():
    good, weak = tiny_model(0), tiny_model(1)
    pos, cell, numbers = random_cell()
    s_good, s_weak = score_of(good, pos, cell, numbers), score_of(weak, pos, cell, numbers)
    assert (s_good - s_weak).abs().max() > 1e-3  # two different models
    guided = score_of(AutoguidedScoreModel(good, weak, 0.7), pos, cell, numbers)
    torch.testing.assert_close(guided, 1.7 * s_good - 0.7 * s_weak)
    torch.testing.assert_close(score_of(AutoguidedScoreModel(good, weak, 0.0), pos, cell,
                                        numbers), s_good)


def test_autoguided_model_keeps_what_both_models_keep_for_a_backward_pass():
    good, weak = tiny_model(0), tiny_model(1)
    weak.recompute_min_edges = 0  # the weaker model recomputes, the good one does not
    good.recompute_min_edges = 2 ** 62
    both = AutoguidedScoreModel(good, weak, 0.7)
    assert both.kept_mb(10_000) == good.kept_mb(10_000) + weak.kept_mb(10_000)
    assert weak.kept_mb(10_000) < 0.1 * good.kept_mb(10_000)


def test_autoguided_score_is_equivariant():
    model = AutoguidedScoreModel(tiny_model(0), tiny_model(1), 1.0)
    pos, cell, numbers = random_cell()
    torch.manual_seed(3)
    rotation = o3.rand_matrix().double()
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(4))
    rotated = score_of(model, pos[perm] @ rotation.T, cell @ rotation.T, numbers[perm])
    expected = score_of(model, pos, cell, numbers)[perm] @ rotation.T
    assert (rotated - expected).norm() / expected.norm() < 1e-5  # the tolerance


def test_weights_below_zero_and_two_cutoffs_are_refused():
    with pytest.raises(ValueError, match="≥ 0"):
        AutoguidedScoreModel(tiny_model(0), tiny_model(1), -0.5)
    with pytest.raises(ValueError, match="one cutoff"):
        AutoguidedScoreModel(tiny_model(0), tiny_model(1, cutoff_A=3.5), 1.0)
    with pytest.raises(ValueError, match="from_g_cm3 < to_g_cm3"):
        AutoguidedScoreModel(tiny_model(0), tiny_model(1), 1.0, from_g_cm3=3.0)


def test_the_weight_ramps_with_each_cells_density_and_the_weak_model_runs_only_where_needed():
    """216 C atoms: 3.0 g/cm³ gets w = 0, 3.25 w/2, 3.5 and above w; cells batched together each
    get their own weight, and a batch of light cells never calls the weaker model."""
    from xanesdiff.diffusion.sampling import cubic_cell_for_density

    good, weak = tiny_model(0), tiny_model(1)
    model = AutoguidedScoreModel(good, weak, 2.0, from_g_cm3=3.0, to_g_cm3=3.5)
    densities = [2.0, 3.0, 3.25, 3.5, 3.8]
    cells = torch.stack([torch.as_tensor(cubic_cell_for_density(216, rho)) for rho in densities])
    batch = torch.arange(len(densities)).repeat_interleave(216)
    numbers = torch.full((len(batch),), 6, dtype=torch.long)
    torch.testing.assert_close(model.cell_weights(numbers, cells, batch),
                               torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0], dtype=torch.float64),
                               atol=1e-5, rtol=0)  # masses in float32
    # what reports say: the weight at a density, None for a model that is not autoguided
    assert [autoguidance_weight(model, rho) for rho in densities] == pytest.approx(
        [0.0, 0.0, 1.0, 2.0, 2.0])
    assert autoguidance_weight(good, 3.5) is None
    # a mixed batch of a light cell (24 C in (8 Å)³: 0.94 g/cm³, w = 0) and a dense one
    # (24 C in (5 Å)³: 3.83 g/cm³, w = 2): each cell's score is its own (1 + w)·good − w·weak
    pos, _, _ = random_cell(24, 5.0)
    cells = torch.stack([torch.eye(3, dtype=torch.float64) * 8.0,
                         torch.eye(3, dtype=torch.float64) * 5.0])
    batch = torch.arange(2).repeat_interleave(24)
    numbers = torch.full((48,), 6, dtype=torch.long)
    args = mixed_batch_args(torch.cat([pos * 1.6, pos]), cells, numbers, batch)
    w = model.cell_weights(numbers, cells, batch)
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0], dtype=torch.float64))
    s_good, s_weak = good(*args), weak(*args)
    torch.testing.assert_close(model(*args), s_good + w[batch].unsqueeze(-1) * (s_good - s_weak))
    calls = []
    weak.register_forward_hook(lambda *a: calls.append(1))
    light = mixed_batch_args(pos * 1.6, cells[:1], numbers[:24], batch[:24])
    torch.testing.assert_close(model(*light), good(*light))
    assert calls == []


def mixed_batch_args(pos, cells, numbers, batch, sigma=0.3):
    """The score model's arguments for cells (B,3,3) batched by `batch`."""
    from xanesdiff.diffusion.neighbors import NeighborListCache

    edge_index, edge_shift = NeighborListCache(3.0, 0.0).get(pos, cells, batch)
    return (pos, cells, numbers, torch.tensor(sigma, dtype=pos.dtype), edge_index, edge_shift,
            batch)


def test_load_prior_with_a_weaker_checkpoint(tmp_path):
    good = save_prior(tmp_path / "good.pt", tiny_model(0), VESchedule(0.8))
    weak = save_prior(tmp_path / "weak.pt", tiny_model(1), VESchedule(0.8))
    pos, cell, numbers = random_cell()
    pos[1] = pos[0] + torch.tensor([0.6, 0.0, 0.0], dtype=pos.dtype)  # inside the hard core
    plain = {p: load_prior(p, hard_core_A=1.1).to(torch.float64) for p in (good, weak)}
    guided = load_prior(good, hard_core_A=1.1, autoguidance=Autoguidance(weak, 1.0)
                        ).to(torch.float64)
    assert guided.metadata["autoguidance"]["weaker"] == str(weak)
    s = {p: prior.score(pos, cell, numbers, 0.2) for p, prior in plain.items()}
    # The hard core's score is in both plain scores and once in the guided one: 2·good − weak.
    torch.testing.assert_close(guided.score(pos, cell, numbers, 0.2), 2 * s[good] - s[weak])
    x = pos.clone().requires_grad_(True)
    guided.score(x, cell, numbers, 0.2).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    frames = guided.sample(n_atoms=16, density_g_cm3=2.0, n_samples=2, seed=0,
                           sampler=EulerMaruyama(guided.schedule, n_steps=4))
    assert len(frames) == 2 and np.isfinite(frames[0].positions).all()


def test_a_weaker_prior_that_does_not_fit_is_named(tmp_path):
    good = save_prior(tmp_path / "good.pt", tiny_model(0), VESchedule(0.8))
    other_cutoff = save_prior(tmp_path / "cutoff.pt", tiny_model(1, 3.5), VESchedule(0.8))
    other_schedule = save_prior(tmp_path / "schedule.pt", tiny_model(1), VESchedule(0.5))
    with pytest.raises(XanesdiffInputError, match="one cutoff") as err:
        load_prior(good, autoguidance=Autoguidance(other_cutoff))
    assert "cutoff.pt" in str(err.value)
    with pytest.raises(XanesdiffInputError, match="schedule") as err:
        load_prior(good, autoguidance=Autoguidance(other_schedule))
    assert "schedule.pt" in str(err.value)
    with pytest.raises(XanesdiffInputError, match="does not exist"):
        load_prior(good, autoguidance=Autoguidance(tmp_path / "missing.pt"))


def test_auto_is_the_pairing_shipped_for_the_default_prior_and_nothing_for_others(tmp_path):
    from xanesdiff.diffusion.prior import (SHIPPED_AUTOGUIDANCE, prior_checkpoint_path,
                                           resolve_autoguidance)

    default = prior_checkpoint_path("default")
    assert resolve_autoguidance("auto", default) == SHIPPED_AUTOGUIDANCE["default"]
    assert resolve_autoguidance("auto", prior_checkpoint_path("fast")) is None
    assert resolve_autoguidance("none", default) is None
    assert resolve_autoguidance({"weaker": "x.pt", "weight": 0.5}, default) == Autoguidance(
        "x.pt", 0.5)
    with pytest.raises(XanesdiffInputError, match="autoguidance.*auto, none or a mapping"):
        resolve_autoguidance("always", default)
    with pytest.raises(XanesdiffInputError, match="weaker, weight, from_g_cm3, to_g_cm3"):
        resolve_autoguidance({"weaker": "x.pt", "strength": 2}, default)


def test_generate_config_switches_autoguidance_on_by_default_and_off_by_override():
    from xanesdiff.guidance.request import compose_generate_config, load_configured_prior

    on = load_configured_prior(compose_generate_config([]))
    off = load_configured_prior(compose_generate_config(["models.autoguidance=none"]))
    assert isinstance(on.score_model, AutoguidedScoreModel)
    assert on.score_model.weak.config() == load_prior("without_2.5").score_model.config()
    assert not isinstance(off.score_model, AutoguidedScoreModel)
    # below 3.0 g/cm³ the autoguided default scores exactly as the plain one
    from xanesdiff.diffusion.sampling import cubic_cell_for_density

    cell = torch.as_tensor(cubic_cell_for_density(64, 2.5))
    pos = torch.rand(64, 3, generator=torch.Generator().manual_seed(0)) @ cell.float()
    numbers = torch.full((64,), 6)
    torch.testing.assert_close(on.score(pos, cell, numbers, 0.1),
                               off.score(pos, cell, numbers, 0.1))
    dense = torch.as_tensor(cubic_cell_for_density(64, 3.5))
    pos = pos @ torch.linalg.inv(cell.float()) @ dense.float()
    difference = on.score(pos, dense, numbers, 0.1) - off.score(pos, dense, numbers, 0.1)
    assert difference.abs().max() > 1e-3
