"""The hard-core score: exact gradient of its energy, periodic images, and what it does in a
sampler (collapsed pairs are pushed apart; structures without close pairs are untouched)."""

import torch

from xanesdiff.datasets.graph import periodic_graph, wrap_positions
from xanesdiff.diffusion.hard_core import HardCoreScore
from xanesdiff.diffusion.samplers import EulerMaruyama

from guidance_toys import tiny_prior

CELL = torch.tensor([[6.0, 0.0, 0.0], [0.8, 5.5, 0.0], [-0.4, 0.6, 6.2]], dtype=torch.float64)


def close_pairs_structure():
    """Atoms of a triclinic cell with two close pairs, one of them across a cell face."""
    frac = torch.tensor([[0.10, 0.20, 0.30], [0.16, 0.22, 0.31],     # 0–1: ≈0.4 Å apart
                         [0.99, 0.50, 0.50], [0.05, 0.52, 0.49],     # 2–3: across the x face
                         [0.50, 0.80, 0.70], [0.60, 0.40, 0.90]], dtype=torch.float64)
    return frac @ CELL


def edges(pos, cutoff_A=2.5):
    g = periodic_graph(pos.detach(), CELL, torch.full((pos.shape[0],), 6), cutoff_A)
    return g.edge_index, g.edge_shift.double()


def test_score_is_minus_gradient_of_energy_and_finite_differences():
    core, sigma = HardCoreScore(r_core_A=1.1), 0.2
    pos = close_pairs_structure().requires_grad_(True)
    edge_index, edge_shift = edges(pos)
    energy = core.energy(pos, CELL, edge_index, edge_shift, None, sigma)
    assert float(energy.detach()) > 0
    (grad,) = torch.autograd.grad(energy, pos)
    score = core(pos.detach(), CELL, edge_index, edge_shift, None, sigma)
    assert torch.allclose(score, -grad, atol=1e-10)
    assert score[2].norm() > 0 and score[3].norm() > 0  # the pair across the face is seen
    assert score[4:].abs().max() == 0  # atoms without a close neighbour feel nothing
    h = 1e-6
    for atom, axis in [(0, 0), (1, 2), (3, 0)]:
        plus, minus = pos.detach().clone(), pos.detach().clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        e = [float(core.energy(p, CELL, edge_index, edge_shift, None, sigma)) for p in (plus, minus)]
        assert abs(-(e[0] - e[1]) / (2 * h) - float(score[atom, axis])) < 1e-5


def test_pairs_pushed_apart_symmetrically_and_invariant_to_images_and_order():
    core, sigma = HardCoreScore(r_core_A=1.1), 0.1
    pos = close_pairs_structure()
    score = core(pos, CELL, *edges(pos), None, sigma)
    assert torch.allclose(score[0], -score[1]) and torch.allclose(score[2], -score[3])
    assert float(score[0] @ (pos[1] - pos[0])) < 0  # atom 0 pushed away from atom 1
    shifted = wrap_positions(pos + torch.tensor([2.3, -1.7, 4.1], dtype=torch.float64), CELL)
    assert torch.allclose(core(shifted, CELL, *edges(shifted), None, sigma), score, atol=1e-10)
    order = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(0))
    permuted = core(pos[order], CELL, *edges(pos[order]), None, sigma)
    assert torch.allclose(permuted, score[order], atol=1e-10)


def test_silent_without_close_pairs_and_at_large_noise():
    core = HardCoreScore(r_core_A=1.1, sigma_max_A=0.4)
    pos = close_pairs_structure()
    assert core(pos, CELL, *edges(pos), None, 0.5).abs().max() == 0
    spread = torch.tensor([[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [0.1, 0.6, 0.4]],
                          dtype=torch.float64) @ CELL
    assert core(spread, CELL, *edges(spread), None, 0.05).abs().max() == 0


def test_sampler_separates_a_collapsed_pair():
    # A tiny random-weight prior knows nothing about carbon; with the hard core, a pair
    # started 0.3 Å apart ends at least r_core − 0.1 Å apart after the low-noise steps.
    torch.manual_seed(0)
    cell = torch.eye(3, dtype=torch.float64) * 8.0
    pos = torch.tensor([[1.0, 1.0, 1.0], [1.3, 1.0, 1.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    numbers = torch.full((3,), 6)
    distances = {}
    for r_core in (None, 1.1):
        prior = tiny_prior()
        prior.hard_core = None if r_core is None else HardCoreScore(r_core)
        sampler = EulerMaruyama(prior.schedule, n_steps=40, t_start=0.3, t_end=0.04,
                                final_denoise=False, noise_scale=0.0)
        end = sampler.sample(pos, lambda x, t: prior.score(x, cell, numbers, t),
                             lambda x: wrap_positions(x, cell), torch.Generator().manual_seed(1))
        distances[r_core] = float((end[1] - end[0]).norm())
    assert distances[1.1] >= 1.0 > distances[None]
