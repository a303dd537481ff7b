"""Scale: a local denoiser samples cells far larger than its training cells (issue 6)."""

import time

import numpy as np
import torch

from guidance_toys import tiny_prior
from xanesdiff.datasets.graph import periodic_neighbor_list
from xanesdiff.diffusion.samplers import EulerMaruyama
from xanesdiff.diffusion.sampling import sample_structures


def test_samples_a_2000_atom_cell_with_a_tiny_model():
    prior = tiny_prior(dtype=torch.float32)
    sampler = EulerMaruyama(prior.schedule, n_steps=6, t_end=0.05, final_corrector_steps=0)
    start = time.perf_counter()
    (atoms,) = sample_structures(prior, n_atoms=2000, density_g_cm3=2.5, sampler=sampler, seed=3)
    elapsed = time.perf_counter() - start
    assert len(atoms) == 2000 and np.isfinite(atoms.positions).all()
    frac = atoms.get_scaled_positions(wrap=False)
    assert (frac >= -1e-6).all() and (frac < 1 + 1e-6).all()
    assert abs(atoms.get_volume() - 2000 * 12.011 * 1.66054 / 2.5) < 1.0
    # The neighbour-list cache rebuilt the graph only when atoms moved more than half the skin.
    assert prior.neighbors.n_builds <= sampler.n_score_evals
    print(f"2000-atom sample with {sampler.n_score_evals} score evaluations: {elapsed:.1f} s")


def test_score_of_a_replicated_cell_is_the_replicated_score():
    """Locality: the score of a 2×2×2 supercell equals the unit cell's score on every image."""
    prior = tiny_prior()
    rng = np.random.default_rng(0)
    cell = np.eye(3) * 7.0
    pos = rng.uniform(0, 1, (40, 3)) @ cell
    numbers = torch.full((40,), 6)
    small = prior.score(torch.tensor(pos), torch.tensor(cell), numbers, 0.2)
    shifts = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)])
    big_pos = np.concatenate([pos + s @ cell for s in shifts])
    prior.neighbors.clear()
    big = prior.score(torch.tensor(big_pos), torch.tensor(2 * cell),
                      torch.full((320,), 6), 0.2)
    torch.testing.assert_close(big, small.repeat(8, 1), rtol=1e-6, atol=1e-8)
