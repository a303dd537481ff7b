"""Equivariance, periodicity and schedule identities of the diffusion prior's parts."""

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3

from xanesdiff.datasets.graph import fractional, periodic_graph, wrap_positions
from xanesdiff.diffusion.loss import dsm_loss
from xanesdiff.diffusion.neighbors import NeighborListCache
from xanesdiff.datasets.graph import minimum_image
from xanesdiff.diffusion.schedule import VESchedule
from xanesdiff.diffusion.painn_score_model import PaiNNScoreModel
from xanesdiff.diffusion.score_model import EquivariantScoreModel


def small_model(**kw):
    torch.manual_seed(0)
    config = dict(cutoff_A=3.0, irreps_hidden="8x0e + 4x1o + 2x1e", n_layers=2, lmax=2,
                  radial_hidden=8, n_basis=4, n_noise_features=8)
    config.update(kw)
    return EquivariantScoreModel(**config).double()


def small_painn(**kw):
    torch.manual_seed(0)
    config = dict(cutoff_A=3.0, width=8, n_layers=2, n_basis=4, n_noise_features=8)
    config.update(kw)
    return PaiNNScoreModel(**config).double()


SCORE_MODELS = {"l1": small_model,
                "l3": lambda: small_model(irreps_hidden="8x0e + 4x1o + 2x2e + 2x3o", lmax=3),
                "painn": small_painn,
                "painn_angular": lambda: small_painn(angular_lmax=3)}


@pytest.fixture(scope="module")
def cell_and_pos():
    gen = torch.Generator().manual_seed(1)
    # a triclinic cell, ~40 atoms at ~2 g/cm³
    cell = torch.tensor([[7.2, 0.0, 0.0], [1.1, 6.9, 0.0], [-0.7, 0.8, 7.4]], dtype=torch.float64)
    pos = torch.rand((40, 3), generator=gen, dtype=torch.float64) @ cell
    numbers = torch.full((40,), 6, dtype=torch.long)
    numbers[::7] = 1  # multi-element input
    return cell, pos, numbers


def scores(model, pos, cell, numbers, sigma=0.3):
    g = periodic_graph(pos, cell, numbers, model.cutoff_A)
    return model(pos, cell.unsqueeze(0), numbers, torch.tensor(sigma, dtype=pos.dtype),
                 g.edge_index, g.edge_shift.double())


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", SCORE_MODELS)
def test_rotation_translation_permutation_equivariance(cell_and_pos, kind):
    cell, pos, numbers = cell_and_pos
    model = SCORE_MODELS[kind]()
    ref = scores(model, pos, cell, numbers)
    assert ref.norm() > 0
    torch.manual_seed(3)
    rot = o3.rand_matrix().double()
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(4))
    shift = torch.tensor([2.3, -5.1, 0.7], dtype=torch.float64)
    cell_r = cell @ rot.T
    pos_r = wrap_positions((pos + shift) @ rot.T, cell_r)[perm]
    out = scores(model, pos_r, cell_r, numbers[perm])
    assert rel_err(out, (ref @ rot.T)[perm]) < 1e-5
    # an improper rotation (parity): the output is a polar vector (1o)
    out_inv = scores(model, -pos, -cell, numbers)
    assert rel_err(out_inv, -ref) < 1e-5


def density_conditioned_model(kind="l1"):
    """A model whose density embedding is switched on (its last layer is random, not zero)."""
    model = {"l1": small_model, "painn": small_painn}[kind](n_density_features=6)
    torch.nn.init.normal_(model.density_embedding.mlp[-1].weight, std=0.5)
    return model


@pytest.mark.parametrize("kind", ["l1", "painn"])
def test_density_conditioned_model_is_equivariant_and_uses_each_cells_density(cell_and_pos,
                                                                             kind):
    cell, pos, numbers = cell_and_pos
    model = density_conditioned_model(kind)
    ref = scores(model, pos, cell, numbers)
    torch.manual_seed(5)
    rot = o3.rand_matrix().double()
    assert rel_err(scores(model, pos @ rot.T, cell @ rot.T, numbers), ref @ rot.T) < 1e-5
    # the density features change the scores (the same model with the embedding zeroed differs)
    blind = density_conditioned_model(kind)
    torch.nn.init.zeros_(blind.density_embedding.mlp[-1].weight)
    assert rel_err(scores(blind, pos, cell, numbers), ref) > 1e-3
    big_cell = cell * 1.6
    # in a batch, each cell is conditioned on its own density
    from xanesdiff.datasets.graph import periodic_graph as graph

    g1, g2 = graph(pos, cell, numbers, 3.0), graph(pos, big_cell, numbers, 3.0)
    n = len(pos)
    edge_index = torch.cat([g1.edge_index, g2.edge_index + n], dim=1)
    edge_shift = torch.cat([g1.edge_shift, g2.edge_shift]).double()
    batch = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    both = model(torch.cat([pos, pos]), torch.stack([cell, big_cell]), numbers.repeat(2),
                 torch.tensor(0.3, dtype=torch.float64), edge_index, edge_shift, batch)
    assert rel_err(both[:n], ref) < 1e-10
    assert rel_err(both[n:], scores(model, pos, big_cell, numbers)) < 1e-10


def test_cell_density_is_the_mass_density_in_g_cm3():
    from ase.build import bulk

    from xanesdiff.diffusion.score_model import DensityEmbedding

    diamond = bulk("C", "diamond", a=3.567, cubic=True)
    rho = DensityEmbedding.cell_density_g_cm3(
        torch.as_tensor(diamond.get_masses()), torch.as_tensor(diamond.cell.array).unsqueeze(0),
        torch.zeros(len(diamond), dtype=torch.long))
    assert float(rho) == pytest.approx(3.516, abs=2e-3)


def test_a_new_density_embedding_leaves_a_trained_model_unchanged(cell_and_pos):
    cell, pos, numbers = cell_and_pos
    plain = small_model()
    conditioned = small_model(n_density_features=6)
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("density_embedding.") for k in missing)
    assert rel_err(scores(conditioned, pos, cell, numbers), scores(plain, pos, cell, numbers)) == 0


def test_edge_blocks_give_the_same_scores_and_gradients(cell_and_pos, monkeypatch):
    from xanesdiff.diffusion.score_model import Interaction

    cell, pos, numbers = cell_and_pos
    model = small_model()
    g = periodic_graph(pos, cell, numbers, model.cutoff_A)
    results = []
    for block in (10 ** 9, 37):  # one block for all edges, then many ragged ones
        monkeypatch.setattr(Interaction, "edge_block", block)
        x = pos.clone().requires_grad_(True)
        out = model(x, cell.unsqueeze(0), numbers, torch.tensor(0.3, dtype=pos.dtype),
                    g.edge_index, g.edge_shift.double())
        (grad,) = torch.autograd.grad((out ** 2).sum(), x)
        results.append((out.detach(), grad))
    assert rel_err(results[1][0], results[0][0]) < 1e-12
    assert rel_err(results[1][1], results[0][1]) < 1e-12


def _saved_bytes_and_gradients(model, pos, cell, numbers):
    """Bytes autograd keeps for one differentiated score call, and the gradients with respect
    to positions and parameters."""
    g = periodic_graph(pos, cell, numbers, model.cutoff_A)
    saved = {}  # storage address -> bytes: views and tensors saved twice count once

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = pos.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, cell.unsqueeze(0), numbers, torch.tensor(0.3, dtype=pos.dtype),
                    g.edge_index, g.edge_shift.double())
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out ** 2).sum(), [x, *params])
    return out.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("kind", ["l1", "painn"])
def test_recomputed_messages_give_the_same_scores_and_gradients_and_keep_less(cell_and_pos,
                                                                             monkeypatch, kind):
    from xanesdiff.diffusion.score_model import Interaction
    from xanesdiff.forward.gnn_scratch import PaiNNMessage

    cell, pos, numbers = cell_and_pos
    for layer in (Interaction, PaiNNMessage):
        monkeypatch.setattr(layer, "edge_block", 64)  # several blocks in this small cell
    model = SCORE_MODELS[kind]()
    model.recompute_min_edges = 10 ** 9
    plain = _saved_bytes_and_gradients(model, pos, cell, numbers)
    model.recompute_min_edges = 0
    recomputed = _saved_bytes_and_gradients(model, pos, cell, numbers)
    assert rel_err(recomputed[0], plain[0]) == 0
    for a, b in zip(recomputed[1], plain[1]):
        assert rel_err(a, b) < 1e-12
    assert recomputed[2] < 0.5 * plain[2]


def _graph_nodes(tensor) -> int:
    """Autograd nodes reachable from `tensor` (the records a forward pass keeps)."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_recomputed_row_sums_match_index_add_to_second_order_and_record_one_node_per_block():
    from xanesdiff.datasets.graph import add_rows

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (30,), generator=gen)

    def terms(rows):  # reads `weight` besides its argument, as a layer reads its parameters
        return torch.tanh(rows @ weight) * rows.sum(-1, keepdim=True)

    def summed(x, weight, recompute):
        total = torch.zeros(5, 4, dtype=x.dtype)
        for block in (slice(0, 12), slice(12, 30)):
            total = add_rows(total, index[block], terms, (x[block],), recompute, params=(weight,))
        return total ** 2

    expected = torch.zeros(5, 4, dtype=torch.float64).index_add(0, index, terms(x)) ** 2
    torch.testing.assert_close(summed(x, weight, True), expected, rtol=1e-14, atol=0)
    assert torch.autograd.gradcheck(lambda a, w: summed(a, w, True), (x, weight))
    assert torch.autograd.gradgradcheck(lambda a, w: summed(a, w, True), (x, weight))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        add_rows(torch.zeros(5, 4, dtype=torch.float64), index, terms, (x * 1.0,), True,
                 params=(weight,))
    assert sorted(shapes) == sorted([index.shape, x.shape])  # not the terms
    # two blocks: two records (plus the inputs' own), however many operations `terms` has
    assert _graph_nodes(summed(x, weight, True)) < _graph_nodes(summed(x, weight, False)) - 4


def test_recomputed_function_passes_plain_arguments_and_differentiates_every_output():
    """`recomputed` as the M3GNet featuriser uses it: an int among the arguments, a tuple of
    outputs of which the loss reads one only, a weight read besides the arguments."""
    from xanesdiff.datasets.graph import recomputed

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def block(power, a, b):
        return torch.sin(a @ weight) ** power, a * b

    def loss(a, b, weight, recompute, both=True):
        first, second = recomputed(block, 2, a, b, params=(weight,)) if recompute else block(2, a, b)
        return (first.sum() + (second ** 2).sum()) if both else first.sum()

    for both in (True, False):
        torch.testing.assert_close(loss(a, b, weight, True, both), loss(a, b, weight, False, both),
                                   rtol=1e-14, atol=0)
        assert torch.autograd.gradcheck(lambda *x: loss(*x, True, both), (a, b, weight))
        assert torch.autograd.gradgradcheck(lambda *x: loss(*x, True, both), (a, b, weight))


def test_recomputed_score_call_records_a_graph_whose_size_does_not_grow_with_the_layers_work(
        cell_and_pos, monkeypatch):
    """The forward pass of a recomputed score call keeps one record per block of edges, not one
    per tensor-product operation (those records fragmented the heap of large cells)."""
    from xanesdiff.diffusion.score_model import Interaction

    cell, pos, numbers = cell_and_pos
    monkeypatch.setattr(Interaction, "edge_block", 64)
    model = small_model()
    g = periodic_graph(pos, cell, numbers, model.cutoff_A)
    nodes = {}
    for recompute_min_edges in (10 ** 9, 0):
        model.recompute_min_edges = recompute_min_edges
        out = model(pos.clone().requires_grad_(True), cell.unsqueeze(0), numbers,
                    torch.tensor(0.3, dtype=pos.dtype), g.edge_index, g.edge_shift.double())
        nodes[recompute_min_edges] = _graph_nodes(out)
    blocks = -(-g.edge_index.shape[1] // 64) * len(model.layers)
    assert nodes[0] < nodes[10 ** 9] / 3
    assert nodes[10 ** 9] - nodes[0] > 5 * blocks  # every block's operations are gone


def test_add_rows_matches_index_add_in_value_and_gradient_and_keeps_only_the_index():
    from xanesdiff.datasets.graph import AddRows

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(30, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (30,), generator=gen)

    def summed_in_two_blocks(v):
        total = AddRows.apply(torch.zeros(5, 4, dtype=v.dtype), index[:12], v[:12] * 2)
        return AddRows.apply(total, index[12:], v[12:] ** 2) ** 2

    expected = torch.zeros(5, 4, dtype=torch.float64).index_add(
        0, index, torch.cat([values[:12] * 2, values[12:] ** 2])) ** 2
    assert torch.equal(summed_in_two_blocks(values), expected)
    assert torch.autograd.gradcheck(summed_in_two_blocks, (values,))
    assert torch.autograd.gradgradcheck(summed_in_two_blocks, (values,))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t,
                                                  lambda t: t):
        AddRows.apply(torch.zeros(5, 4, dtype=torch.float64), index, values * 1.0)
    assert shapes == [index.shape]


def test_score_model_recomputes_when_the_kept_messages_would_crowd_memory(monkeypatch):
    from xanesdiff.diffusion import score_model as module

    model = small_model()
    edges = 10 ** 6
    budget_mb = edges * module.KEPT_MB_PER_EDGE / module.RECOMPUTE_MEMORY_FRACTION
    monkeypatch.setattr(module, "device_memory_mb", lambda device=None: 0.5 * budget_mb)
    assert model.recomputes(edges)
    monkeypatch.setattr(module, "device_memory_mb", lambda device=None: 2.0 * budget_mb)
    assert not model.recomputes(edges)
    model.recompute_min_edges = edges  # an explicit threshold wins
    assert model.recomputes(edges) and not model.recomputes(edges - 1)


@pytest.mark.parametrize("irreps", [{}, {"irreps_hidden": "8x0e + 4x1o + 2x2e + 2x3o", "lmax": 3}])
def test_last_layer_skips_only_paths_the_readout_cannot_see(cell_and_pos, irreps):
    cell, pos, numbers = cell_and_pos
    model = small_model(**irreps)
    last = model.layers[-1]
    assert last.tp_used is not None
    assert len(last.tp_used.instructions) < len(last.tp.instructions)
    g = periodic_graph(pos, cell, numbers, model.cutoff_A)
    results = []
    for skip in (True, False):  # skipping the paths, then every path
        last.skip_unused_paths = skip
        x = pos.clone().requires_grad_(True)
        out = model(x, cell.unsqueeze(0), numbers, torch.tensor(0.3, dtype=pos.dtype),
                    g.edge_index, g.edge_shift.double())
        (grad,) = torch.autograd.grad((out ** 2).sum(), x)
        results.append((out.detach(), grad))
    assert results[0][0].abs().max() > 0
    assert rel_err(results[0][0], results[1][0]) < 1e-12
    assert rel_err(results[0][1], results[1][1]) < 1e-12
    # the pruned product's constants are no part of a checkpoint, not even a deep copy's (EMA)
    assert not any("tp_used" in key for key in copy.deepcopy(model).state_dict())


@pytest.mark.parametrize("kind", ["l1", "painn", "painn_angular"])
def test_periodic_images_give_same_scores(cell_and_pos, kind):
    cell, pos, numbers = cell_and_pos
    model = SCORE_MODELS[kind]()
    ref = scores(model, pos, cell, numbers)
    lattice_shift = torch.tensor([[1, 0, -1], [0, 2, 0]], dtype=torch.float64) @ cell
    moved = pos.clone()
    moved[3] += lattice_shift[0]
    moved[11] += lattice_shift[1]
    assert rel_err(scores(model, moved, cell, numbers), ref) < 1e-6
    # an equivalent (sheared) choice of lattice vectors for the same crystal
    cell2 = cell.clone()
    cell2[2] = cell[2] + cell[0] - cell[1]
    assert rel_err(scores(model, wrap_positions(pos, cell2), cell2, numbers), ref) < 1e-6


def test_skin_graph_equals_fresh_graph(cell_and_pos):
    cell, pos, numbers = cell_and_pos
    model = small_model()
    cache = NeighborListCache(model.cutoff_A, skin_A=1.0)
    edge_index, edge_shift = cache.get(pos, cell)
    out = model(pos, cell.unsqueeze(0), numbers, torch.tensor(0.3, dtype=torch.float64),
                edge_index, edge_shift)
    assert rel_err(out, scores(model, pos, cell, numbers)) < 1e-10
    # small moves reuse the graph; a move beyond skin/2 rebuilds it
    cache.get(pos + 0.2, cell)
    assert cache.n_builds == 1
    moved = pos.clone()
    moved[0, 0] += 0.6
    cache.get(moved, cell)
    assert cache.n_builds == 2


@pytest.mark.parametrize("n_cells", [1, 3])
def test_cached_graph_follows_atoms_wrapped_across_cell_faces(cell_and_pos, n_cells):
    # Samplers wrap positions after every step: an atom that crosses a face jumps by a lattice
    # vector without moving. The cached graph must still describe the same neighbours (a stale
    # image shift once dropped all of that atom's edges across the face).
    cell, pos, numbers = cell_and_pos
    model = small_model()
    cells = cell.unsqueeze(0).repeat(n_cells, 1, 1)
    batch = torch.arange(n_cells).repeat_interleave(pos.shape[0])
    gen = torch.Generator().manual_seed(3)
    start = torch.cat([pos + 0.1 * k for k in range(n_cells)])
    all_numbers = numbers.repeat(n_cells)
    sigma = torch.tensor(0.3, dtype=torch.float64)
    cache = NeighborListCache(model.cutoff_A, skin_A=1.0)
    cache.get(wrap_positions(start, cells, batch), cells, batch)
    moved = wrap_positions(start + 0.3 * (torch.rand(start.shape, generator=gen,
                                                       dtype=torch.float64) - 0.5), cells, batch)
    frac_before = fractional(wrap_positions(start, cells, batch), cells, batch)
    frac_after = fractional(moved, cells, batch)
    assert ((frac_before - frac_after).abs() > 0.5).any(), "no atom crossed a face: weak test"
    edge_index, edge_shift = cache.get(moved, cells, batch)
    assert cache.n_builds == 1  # reused, not rebuilt
    cached = model(moved, cells, all_numbers, sigma, edge_index, edge_shift, batch)
    fresh_cache = NeighborListCache(model.cutoff_A, skin_A=1.0)
    fresh = model(moved, cells, all_numbers, sigma, *fresh_cache.get(moved, cells, batch), batch)
    assert rel_err(cached, fresh) < 1e-10


@pytest.mark.parametrize("kind", ["l1", "painn", "painn_angular"])
def test_score_is_smooth_when_neighbours_cross_cutoff(kind):
    model = SCORE_MODELS[kind]()
    cell = torch.eye(3, dtype=torch.float64) * 12.0
    numbers = torch.tensor([6, 6])
    out = []
    for d in (model.cutoff_A - 1e-4, model.cutoff_A + 1e-4):
        pos = torch.tensor([[1.0, 1.0, 1.0], [1.0 + d, 1.0, 1.0]], dtype=torch.float64)
        out.append(scores(model, pos, cell, numbers))
    assert (out[0] - out[1]).abs().max() < 1e-6


def test_schedule_identities():
    sched = VESchedule(sigma_per_t_A=0.8)
    t = torch.linspace(0.01, 1.0, 7, dtype=torch.float64)
    assert torch.allclose(sched.sigma(t), 0.8 * t)
    assert torch.allclose(sched.t_of_sigma(sched.sigma(t)), t)
    # g² = dσ²/dt, checked by finite differences
    h = 1e-6
    fd = (sched.sigma(t + h) ** 2 - sched.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(sched.diffusion_coeff_sq(t), fd, rtol=1e-6)
    with pytest.raises(ValueError):
        VESchedule(sigma_per_t_A=-1)


def test_marginal_noising_wraps_and_has_the_right_variance():
    sched = VESchedule(0.8)
    cell = torch.tensor([[5.0, 0, 0], [1.0, 5.0, 0], [0, 0, 5.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    pos0 = sched.prior_sampling(20000, cell, gen, torch.float64)
    frac0 = torch.linalg.solve(cell.T, pos0.T).T
    assert (frac0 >= 0).all() and (frac0 < 1).all()
    pos_t, disp = sched.marginal_sample(pos0, cell, torch.tensor(0.5), generator=gen)
    frac = torch.linalg.solve(cell.T, pos_t.T).T
    assert (frac >= 0).all() and (frac < 1).all()
    assert abs(float(disp.std()) - 0.4) < 0.01          # σ(0.5) = 0.4 Å per coordinate
    # the displacement is the minimum image of (x_t − x_0): adding it back lands on x_t modulo cell
    back = wrap_positions(pos0 + disp, cell)
    assert torch.allclose(minimum_image(back - pos_t, cell), torch.zeros_like(pos_t), atol=1e-9)


def test_dsm_loss_is_zero_for_the_exact_score_and_three_for_zero():
    disp = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    sigma = torch.full((500,), 0.3, dtype=torch.float64)
    exact = -disp / sigma[:, None] ** 2
    assert float(dsm_loss(exact, disp, sigma)) < 1e-20
    assert abs(float(dsm_loss(torch.zeros_like(disp), disp, sigma)) - 3.0) < 0.4


def test_noised_dataset_draws_noise_levels_in_range_and_targets_match_positions(a_c_dataset):
    from xanesdiff.diffusion.train import NoisedStructureDataset

    structures = [f.atoms for f in a_c_dataset.frames[:3]]
    sched = VESchedule(0.8)
    data = NoisedStructureDataset(structures, sched, cutoff_A=3.0, length=40, t_min=0.05,
                                  t_max_train=2.0, extra_noise_fraction=0.25, t_power=1.5)
    sigmas = torch.stack([data[i].sigma[0] for i in range(40)])
    assert (sigmas >= 0.8 * 0.05 - 1e-6).all() and (sigmas <= 1.6 + 1e-6).all()
    assert 0 < int((sigmas > 0.8).sum()) < 40
    item = data[0]
    # x_t − displacement is a clean training structure (modulo the cell)
    clean = wrap_positions(item.pos - item.displacement, item.cell)
    originals = [torch.tensor(a.positions, dtype=torch.float32) for a in structures]
    assert any(float(minimum_image(clean - wrap_positions(o, item.cell), item.cell).abs().max())
               < 1e-3 for o in originals if o.shape == clean.shape)
    assert data[5].edge_index.shape[1] > 0


def _share_of_draws(data, structures, chosen, n_draws=2000):
    """Fraction of `n_draws` training items whose clean cell is one of the `chosen` indices.
    (The draws are seeded with the process id: 400 draws, a standard error of 0.025, once
    missed a 0.08 tolerance in CI; 2000 draws make it 0.011.)"""
    hits = 0
    for epoch in range(n_draws):  # one draw per epoch, made as __getitem__ makes it
        data.epoch = epoch
        volume = float(torch.linalg.det(data[0].cell.reshape(3, 3)).abs())
        drawn = min(range(len(structures)), key=lambda k: abs(structures[k].get_volume() - volume))
        hits += drawn in chosen
    return hits / n_draws


def test_network_weights_and_balance_set_how_often_each_network_is_drawn(a_c_dataset):
    from omegaconf import OmegaConf

    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.diffusion.train import NoisedStructureDataset
    from xanesdiff.scripts.train_prior import select_structures

    cfg = OmegaConf.create({"root": None, "asset": "data/a-C", "exclude_densities": [2.0],
                            "density_tol_g_cm3": 0.1, "network_weights": {"3.5": 4.0},
                            "balance_networks": False})
    for balance in (False, True):
        cfg.balance_networks = balance
        structures, excluded, weights = select_structures(cfg)
        density = [round(float(a.get_masses().sum() / a.get_volume() * 1.66053906660), 1)
                   for a in structures]
        assert len(excluded) == 1 and 2.0 not in density
        dense = {k for k, d in enumerate(density) if d == 3.5}
        n_cells = {d: density.count(d) for d in set(density)}  # 12 / 4 / 3 / 3 snapshots
        if balance:  # every network one share, the 3.5 network four
            expected = 4 / 7
            assert sum(weights[k] for k in dense) == pytest.approx(4.0)
        else:  # every cell one share, each 3.5 cell four
            expected = 4 * n_cells[3.5] / (sum(n_cells.values()) + 3 * n_cells[3.5])
            assert {d: w for d, w in zip(density, weights)} == {1.5: 1, 2.5: 1, 3.0: 1, 3.5: 4}
        data = NoisedStructureDataset(structures, VESchedule(0.8), cutoff_A=3.0, length=1,
                                      weights=weights)
        assert abs(_share_of_draws(data, structures, dense) - expected) < 0.08, (balance,
                                                                                expected)
    with pytest.raises(ValueError, match="weights"):
        NoisedStructureDataset(structures, VESchedule(0.8), cutoff_A=3.0, weights=[1.0])
    for bad in ({"2.2": 2.0}, {"dense": 2.0}):  # no network at this density; not a density
        cfg.network_weights = bad
        with pytest.raises(XanesdiffInputError, match="network_weights"):
            select_structures(cfg)


def test_extra_structures_join_the_training_cells_as_one_weighted_network(a_c_dataset,
                                                                          tmp_path):
    """`data.extra_structures={file: w}` adds every frame of the file (relative to the dataset
    folder, or absolute) with w shared among them; bad weights and other elements are refused."""
    import ase.io
    from omegaconf import OmegaConf

    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.scripts.train_prior import select_structures

    cfg = OmegaConf.create({"root": None, "asset": "data/a-C", "exclude_densities": [],
                            "density_tol_g_cm3": 0.1, "network_weights": None,
                            "balance_networks": True, "extra_structures": None})
    plain, _, plain_weights = select_structures(cfg)
    diamond = ase.io.read(Path(os.environ["XANESDIFF_ASSETS"]) / "data/a-C/references/diamond.vasp")
    two_frames = tmp_path / "diamond_twice.extxyz"
    ase.io.write(two_frames, [diamond, diamond])
    cfg.extra_structures = {"references/diamond.vasp": 2.0, str(two_frames): 1.0}
    structures, _, weights = select_structures(cfg)
    assert len(structures) == len(plain) + 3 and weights[:len(plain)] == plain_weights
    assert weights[len(plain):] == [2.0, 0.5, 0.5]
    assert np.allclose(structures[len(plain)].positions, diamond.positions)
    silicon = diamond.copy()
    silicon.numbers[:] = 14
    ase.io.write(tmp_path / "si.extxyz", silicon)
    for bad, expected in (({"references/diamond.vasp": 0}, "positive weight"),
                          ({"references/diamond.vasp": "heavy"}, "positive weight"),
                          ({str(tmp_path / "si.extxyz"): 1}, "Si not supported"),
                          ({"references/nothing.vasp": 1}, "does not exist")):
        cfg.extra_structures = bad
        with pytest.raises(XanesdiffInputError, match=expected):
            select_structures(cfg)


def test_warm_start_adds_a_density_embedding_but_refuses_other_mismatches(tmp_path):
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.diffusion.prior import save_prior
    from xanesdiff.scripts.train_prior import warm_start

    plain = small_model().float()
    save_prior(tmp_path / "plain.pt", plain, VESchedule())
    conditioned = EquivariantScoreModel(**{**plain.config(), "n_density_features": 6})
    warm_start(conditioned, str(tmp_path / "plain.pt"))
    state = conditioned.state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(state[name], value), name
    wider = EquivariantScoreModel(**{**plain.config(), "irreps_hidden": "12x0e + 4x1o + 2x1e"})
    with pytest.raises(XanesdiffInputError, match="do not fit"):
        warm_start(wider, str(tmp_path / "plain.pt"))


def test_warm_start_deepens_a_prior_without_changing_its_scores(tmp_path, cell_and_pos):
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.diffusion.prior import save_prior
    from xanesdiff.scripts.train_prior import warm_start

    cell, pos, numbers = cell_and_pos
    plain = small_model()
    save_prior(tmp_path / "plain.pt", plain, VESchedule())
    deeper = EquivariantScoreModel(**{**plain.config(), "n_layers": 4}).double()
    before = scores(deeper, pos, cell, numbers)
    warm_start(deeper, str(tmp_path / "plain.pt"))
    reference = scores(plain, pos, cell, numbers)
    assert rel_err(before, reference) > 0.1  # a fresh deeper model scores otherwise
    assert rel_err(scores(deeper, pos, cell, numbers), reference) < 1e-6
    # the source's layers kept their weights: its last one is now the deeper model's last
    state = deeper.state_dict()
    for name, value in plain.state_dict().items():
        moved = name.replace("layers.1.", "layers.3.") if name.startswith("layers.1.") else name
        assert torch.equal(state[moved], value), name
    # the inserted layers learn: their output mixes get gradients
    scores(deeper, pos, cell, numbers).pow(2).sum().backward()
    for k in (1, 2):
        assert deeper.layers[k].linear_msg.weight.grad.abs().max() > 0
    shallower = EquivariantScoreModel(**{**plain.config(), "n_layers": 1})
    with pytest.raises(XanesdiffInputError, match="do not fit"):
        warm_start(shallower, str(tmp_path / "plain.pt"))


def test_painn_score_gradient_matches_finite_differences(cell_and_pos):
    """Guidance differentiates through the denoiser: d(w·score)/d(positions) by autograd equals
    central finite differences (the graph is held fixed, as within one sampler step)."""
    cell, pos, numbers = cell_and_pos
    model = small_painn()
    g = periodic_graph(pos, cell, numbers, model.cutoff_A)
    weights = torch.randn(pos.shape, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)

    def objective(p):
        return (model(p, cell.unsqueeze(0), numbers, torch.tensor(0.3, dtype=torch.float64),
                      g.edge_index, g.edge_shift.double()) * weights).sum()

    p = pos.clone().requires_grad_(True)
    grad, = torch.autograd.grad(objective(p), p)
    h = 1e-5
    for atom, axis in [(0, 0), (5, 1), (17, 2), (33, 0)]:
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        with torch.no_grad():
            numeric = (objective(pos + step) - objective(pos - step)) / (2 * h)
        assert float(grad[atom, axis]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-8)


def test_painn_score_model_learns_a_denoising_target(cell_and_pos):
    """A few optimiser steps of denoising score matching lower the loss on a fixed noised batch:
    the parameters all receive gradients and the model can fit."""
    cell, pos, numbers = cell_and_pos
    model = small_painn(width=16).float()
    gen = torch.Generator().manual_seed(6)
    sigma = 0.2
    noise = torch.randn(pos.shape, generator=gen)
    noisy = wrap_positions(pos.float() + sigma * noise, cell.float())
    g = periodic_graph(noisy, cell.float(), numbers, model.cutoff_A)

    def loss():
        out = model(noisy, cell.float().unsqueeze(0), numbers, torch.tensor(sigma),
                    g.edge_index, g.edge_shift.float())
        return ((sigma * out + noise) ** 2).mean()

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss()
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in
               model.named_parameters() if "density" not in name), "a parameter gets no gradient"
    for _ in range(60):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < 0.7 * float(first.detach())


def _noised_batch(cell, pos, numbers, model, sigma=0.2):
    from types import SimpleNamespace

    noise = sigma * torch.randn(pos.shape, generator=torch.Generator().manual_seed(8),
                                dtype=pos.dtype)
    noisy = wrap_positions(pos + noise, cell)
    g = periodic_graph(noisy, cell, numbers, model.cutoff_A)
    n = pos.shape[0]
    return SimpleNamespace(pos=noisy, cell=cell.unsqueeze(0), z=numbers,
                           sigma=torch.full((n,), sigma, dtype=pos.dtype),
                           edge_index=g.edge_index, edge_shift=g.edge_shift.to(pos.dtype),
                           batch=torch.zeros(n, dtype=torch.long), displacement=noise,
                           num_graphs=1)


def test_training_skips_non_finite_losses_and_stops_when_they_persist(cell_and_pos):
    from xanesdiff.diffusion.train import PriorModule

    cell, pos, numbers = cell_and_pos
    model = small_painn()
    module = PriorModule(model, VESchedule())
    data = _noised_batch(cell, pos, numbers, model)
    assert torch.isfinite(module.training_step(data, 0))
    with torch.no_grad():
        model.readout_weights[-1].bias.fill_(float("nan"))  # a diverged model: NaN scores
    for _ in range(module.max_skipped_in_a_row - 1):
        assert module.training_step(data, 0) is None  # skipped: no backward, no step
    with pytest.raises(FloatingPointError, match="non-finite losses in a row"):
        module.training_step(data, 0)


def test_export_refuses_non_finite_weights_and_keeps_the_last_good_files(tmp_path,
                                                                        cell_and_pos):
    from types import SimpleNamespace

    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.diffusion.train import AtomicExport, PriorModule

    module = PriorModule(small_painn(), VESchedule())
    trainer = SimpleNamespace(global_rank=0, global_step=7, callback_metrics={},
                              save_checkpoint=lambda path: Path(path).write_bytes(b"ckpt"))
    export = AtomicExport(str(tmp_path / "last.ckpt"), str(tmp_path / "prior.pt"))
    export.export(trainer, module)
    good = (tmp_path / "prior.pt").read_bytes()
    assert load_prior(tmp_path / "prior.pt").metadata["global_step"] == 7
    with torch.no_grad():
        next(module.ema_model.parameters()).fill_(float("nan"))
    trainer.global_step = 9
    with pytest.raises(FloatingPointError, match="not finite"):
        export.export(trainer, module)
    assert (tmp_path / "prior.pt").read_bytes() == good
    assert (tmp_path / "last.ckpt").read_bytes() == b"ckpt"


def test_painn_kept_memory_estimate_matches_what_autograd_keeps(cell_and_pos):
    """The guided step sizes its memory by `kept_mb`: it must be what a differentiated call of
    the shipped width really keeps (within 25 %)."""
    cell, pos, numbers = cell_and_pos
    cell, pos = cell.float() * 1.6, pos.float() * 1.6  # ≈210 atoms' worth of edges per block
    pos = torch.cat([pos, pos + cell[0] / 2, pos + cell[1] / 2, pos + cell[2] / 2,
                     pos + cell.sum(0) / 2])
    numbers = torch.full((pos.shape[0],), 6)
    model = PaiNNScoreModel(cutoff_A=3.5).requires_grad_(False)  # as loaded for sampling
    n_edges = periodic_graph(pos, cell, numbers, model.cutoff_A).edge_index.shape[1]
    for recompute in (False, True):
        model.recompute_min_edges = 0 if recompute else 10 ** 9
        measured_mb = _saved_bytes_and_gradients(model, pos, cell, numbers)[2] / 2 ** 20
        assert model.kept_mb(n_edges) == pytest.approx(measured_mb, rel=0.3), recompute


def test_angular_invariants_tell_tetrahedral_from_planar_and_ignore_rotation():
    """The bond-order power spectrum: a tetrahedron has no quadrupole (l = 2) but an octupole
    (l = 3); three planar bonds at 120° have a quadrupole; rotating a neighbourhood or
    reordering its bonds changes nothing."""
    from xanesdiff.diffusion.painn_score_model import AngularInvariants

    invariants = AngularInvariants(lmax=3, n_radial=1)
    tetrahedral = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]],
                               dtype=torch.float64) / math.sqrt(3)
    planar = torch.tensor([[1, 0, 0], [-0.5, math.sqrt(3) / 2, 0], [-0.5, -math.sqrt(3) / 2, 0]],
                          dtype=torch.float64)

    def power(units):  # (l = 0…3) for one centre atom whose bonds are `units`, radial weight 1
        ones = torch.ones(len(units), 1, dtype=torch.float64)
        return invariants(units, ones, torch.zeros(len(units), dtype=torch.long), 1)[0]

    tet, pla = power(tetrahedral), power(planar)
    assert tet[2] < 1e-12 and tet[3] > 0.1
    assert pla[2] > 0.1
    torch.manual_seed(9)
    rot = o3.rand_matrix().double()
    for units, ref in ((tetrahedral, tet), (planar, pla)):
        turned = (units @ rot.T)[torch.randperm(len(units))]
        torch.testing.assert_close(power(turned), ref, rtol=1e-6, atol=1e-9)  # float32 rotation


def test_painn_message_with_no_vectors_equals_zero_vectors():
    """A first layer passes `v=None` (all vectors zero) and skips the neighbours' vectors: the
    same messages and gradients as explicit zero vectors, plain and recomputed."""
    from xanesdiff.forward.gnn_scratch import PaiNNMessage

    torch.manual_seed(3)
    layer = PaiNNMessage(width=8, n_rbf=5).double()
    n, e = 6, 20
    s = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    src, dst = torch.randint(0, n, (e,)), torch.randint(0, n, (e,))
    unit = torch.nn.functional.normalize(torch.randn(e, 3, dtype=torch.float64), dim=1)
    rbf = torch.randn(e, 5, dtype=torch.float64, requires_grad=True)
    fcut = torch.rand(e, dtype=torch.float64)
    zeros = torch.zeros(n, 3, 8, dtype=torch.float64)
    for recompute in (False, True):
        results = []
        for v in (None, zeros):
            s_out, v_out = layer(s, v, src, dst, unit, rbf, fcut, recompute=recompute)
            loss = (s_out ** 3).sum() + (v_out ** 2).sum()
            results.append((s_out, v_out, *torch.autograd.grad(loss, [s, rbf])))
        for ours, explicit in zip(*results):
            torch.testing.assert_close(ours, explicit)
    assert results[0][1].abs().max() > 0  # the direction part still makes vectors
