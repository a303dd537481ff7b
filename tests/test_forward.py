"""Forward surrogate: gradients vs finite differences, symmetries, checkpoints, training paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xanesdiff.datasets.errors import XanesdiffInputError


@pytest.fixture(scope="session")
def surrogate():
    from xanesdiff.forward.surrogate import load_surrogate

    return load_surrogate()


@pytest.fixture(scope="session")
def frame(a_c_dataset):
    return next(f for f in a_c_dataset.frames if f.network == "rho2.49")


def _tensors(atoms, dtype=torch.float32):
    return (torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.cell.array, dtype=dtype),
            torch.tensor(atoms.numbers))


def test_default_surrogate_interface(surrogate, frame):
    pos, cell, numbers = _tensors(frame.atoms)
    assert surrogate.absorber == "C"
    assert surrogate.grid.n_points == 100
    sites = surrogate.site_spectra(pos, cell, numbers)
    K = surrogate.n_members
    assert K >= 4 and sites.shape == (K, 216, 100)
    assert (sites >= 0).all()
    # ensemble members are different models, so they disagree somewhere
    assert (sites.mean(1).std(0) > 0).any()
    mean = surrogate.mean_spectrum(pos, cell, numbers)
    assert mean.shape == (K, 100)
    torch.testing.assert_close(mean, sites.mean(1))
    # the shipped model was trained on this network: its mean spectrum is close to the data
    mae = np.abs(mean.mean(0).detach().numpy() - frame.mean_spectrum).mean()
    assert mae < 0.01


def test_site_mask_subsets_and_weights(surrogate, frame):
    pos, cell, numbers = _tensors(frame.atoms)
    sites = surrogate.site_spectra(pos, cell, numbers)
    mask = torch.zeros(216, dtype=torch.bool)
    mask[[3, 17, 100]] = True
    torch.testing.assert_close(surrogate.mean_spectrum(pos, cell, numbers, site_mask=mask),
                               sites[:, mask].mean(1))
    weights = torch.zeros(216)
    weights[5], weights[9] = 1.0, 3.0
    expected = (sites[:, 5] + 3 * sites[:, 9]) / 4
    torch.testing.assert_close(surrogate.mean_spectrum(pos, cell, numbers, site_mask=weights),
                               expected)
    with pytest.raises(XanesdiffInputError, match="selects no"):
        surrogate.mean_spectrum(pos, cell, numbers, site_mask=torch.zeros(216, dtype=torch.bool))
    with pytest.raises(XanesdiffInputError, match="site_mask has 7"):
        surrogate.mean_spectrum(pos, cell, numbers, site_mask=torch.ones(7, dtype=torch.bool))


def test_only_absorbers_get_spectra(surrogate, frame):
    """A non-absorbing atom (here a Si substituted for C) gets no row; the rows keep atom order."""
    atoms = frame.atoms.copy()
    numbers = atoms.numbers.copy()
    numbers[10] = 14
    pos, cell, _ = _tensors(atoms)
    sites = surrogate.site_spectra(pos, cell, torch.tensor(numbers))
    assert sites.shape[1] == 215
    with pytest.raises(XanesdiffInputError, match="no C atoms"):
        surrogate.site_spectra(pos, cell, torch.full((216,), 14))


def test_permutation_equivariance(surrogate, frame):
    pos, cell, numbers = _tensors(frame.atoms)
    perm = torch.randperm(216, generator=torch.Generator().manual_seed(0))
    base = surrogate.site_spectra(pos, cell, numbers)
    permuted = surrogate.site_spectra(pos[perm], cell, numbers[perm])
    torch.testing.assert_close(permuted, base[:, perm], atol=2e-5, rtol=1e-4)


def test_translation_and_rotation_invariance(surrogate, frame):
    pos, cell, numbers = _tensors(frame.atoms)
    base = surrogate.site_spectra(pos, cell, numbers)
    shifted = surrogate.site_spectra(pos + torch.tensor([3.1, -7.3, 25.0]), cell, numbers)
    torch.testing.assert_close(shifted, base, atol=2e-5, rtol=1e-4)
    from scipy.spatial.transform import Rotation

    rot = torch.tensor(Rotation.random(random_state=3).as_matrix(), dtype=torch.float32)
    rotated = surrogate.site_spectra(pos @ rot.T, cell @ rot.T, numbers)
    torch.testing.assert_close(rotated, base, atol=5e-5, rtol=1e-4)


def test_descriptor_in_recomputed_blocks_gives_the_same_features_and_gradients(frame,
                                                                               monkeypatch):
    """Histograms summed over many blocks of edges and bond pairs, recomputed in the backward
    pass, equal the one-block pass in value and in the gradient w.r.t. positions and cell."""
    from xanesdiff.forward import descriptor as module

    featurizer = module.RadialAngularDescriptor()
    pos, cell, numbers = _tensors(frame.atoms, torch.float64)
    weights = torch.randn(featurizer.feature_dim, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    results = []
    for rows in (10 ** 9, 1000):  # one block, then ≈15 ragged recomputed ones
        monkeypatch.setattr(module, "ROWS_PER_BLOCK", rows)
        p, c = pos.clone().requires_grad_(True), cell.clone().requires_grad_(True)
        features = featurizer(p, c, numbers)
        results.append((features.detach(), *torch.autograd.grad((features ** 2 @ weights).sum(),
                                                                 (p, c))))
    for one_block, blocks in zip(*results):
        torch.testing.assert_close(blocks, one_block, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("featurizer", ["m3gnet", "descriptor"])
def test_gradient_matches_finite_differences(surrogate, frame, featurizer):
    """d(spectrum loss)/d(positions) and /d(cell) against central differences, in float64."""
    import copy

    from xanesdiff.forward.surrogate import build_surrogate

    if featurizer == "m3gnet":
        model = copy.deepcopy(surrogate).double()
    else:
        model = build_surrogate({"type": "descriptor"}, {"n_members": 2, "hidden": [32]},
                                surrogate.grid).double()
        feats = model.featurizer.features_of_atoms(frame.atoms).double()
        model.head.fit_normalisation(feats, torch.tensor(frame.site_spectra, dtype=torch.float64))
        with torch.no_grad():
            model.head.layers[-1].weight.mul_(30.0)  # make the head depend on the features
    pos, cell, numbers = _tensors(frame.atoms, torch.float64)
    target = torch.tensor(frame.mean_spectrum, dtype=torch.float64) * 1.1

    def loss_fn(p, c):
        return ((model.mean_spectrum(p, c, numbers) - target) ** 2).sum()

    pos_v, cell_v = pos.clone().requires_grad_(True), cell.clone().requires_grad_(True)
    loss_fn(pos_v, cell_v).backward()
    assert pos_v.grad.abs().max() > 0
    gen = torch.Generator().manual_seed(1)
    h = 1e-4
    for _ in range(2):
        d = torch.randn(pos.shape, generator=gen, dtype=torch.float64)
        d /= d.norm()
        with torch.no_grad():
            fd = (loss_fn(pos + h * d, cell) - loss_fn(pos - h * d, cell)) / (2 * h)
        analytic = (pos_v.grad * d).sum()
        assert torch.allclose(analytic, fd, rtol=1e-4, atol=1e-9 + 1e-4 * pos_v.grad.norm()), \
            (float(analytic), float(fd))
    # a strain direction of the cell, positions fixed in Cartesian space
    d = torch.tensor([[1.0, 0.2, 0.0], [0.0, -0.5, 0.3], [0.1, 0.0, 0.7]], dtype=torch.float64)
    with torch.no_grad():
        fd = (loss_fn(pos, cell + h * d) - loss_fn(pos, cell - h * d)) / (2 * h)
    analytic = (cell_v.grad * d).sum()
    assert torch.allclose(analytic, fd, rtol=1e-4, atol=1e-9 + 1e-4 * cell_v.grad.norm()), \
        (float(analytic), float(fd))


def test_checkpoint_round_trip(surrogate, frame, tmp_path):
    from xanesdiff.forward.surrogate import build_surrogate, load_surrogate

    pos, cell, numbers = _tensors(frame.atoms)
    path = surrogate.save(tmp_path / "copy.pt")
    again = load_surrogate(path)
    torch.testing.assert_close(again.site_spectra(pos, cell, numbers),
                               surrogate.site_spectra(pos, cell, numbers))
    assert again.grid == surrogate.grid and again.config == surrogate.config
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["kind"] == "forward_surrogate" and ckpt["grid"] == surrogate.grid.to_dict()
    assert ckpt["version"] and ckpt["absorber"] == "C"
    featurizer = ckpt["config"]["featurizer"]
    parts = featurizer["parts"] if featurizer["type"] == "concat" else [featurizer]
    assert any(p["type"] == "m3gnet" for p in parts)
    # a frozen pretrained backbone is an asset referenced by name, not copied into the file
    assert ckpt["featurizer_state"] is None and path.stat().st_size < 5e6
    # a learned featuriser (GNN from scratch) travels inside the checkpoint
    gnn = build_surrogate({"type": "gnn_scratch", "seed": 5}, {"n_members": 2}, surrogate.grid)
    with torch.no_grad():
        for p in gnn.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gnn_again = load_surrogate(gnn.save(tmp_path / "gnn.pt"))
    torch.testing.assert_close(gnn_again.site_spectra(pos, cell, numbers),
                               gnn.site_spectra(pos, cell, numbers))


def test_wrong_checkpoints_are_refused(surrogate, tmp_path):
    from xanesdiff.forward.surrogate import load_surrogate

    ckpt = surrogate.checkpoint_dict()
    torch.save({**ckpt, "kind": "diffusion_prior"}, tmp_path / "prior.pt")
    with pytest.raises(XanesdiffInputError, match="not a forward-surrogate checkpoint"):
        load_surrogate(tmp_path / "prior.pt")
    torch.save({**ckpt, "format": 99, "version": "9.0.0"}, tmp_path / "future.pt")
    with pytest.raises(XanesdiffInputError, match="format 99"):
        load_surrogate(tmp_path / "future.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(XanesdiffInputError, match="could not be read"):
        load_surrogate(tmp_path / "text.pt")
    with pytest.raises(XanesdiffInputError, match="does not exist"):
        load_surrogate(tmp_path / "missing.pt")


def test_train_surrogate_frozen_and_end_to_end(a_c_dataset):
    """Both training paths run and reduce the training loss; members differ."""
    from xanesdiff.forward.surrogate import train_surrogate

    frames = [f for f in a_c_dataset.frames if f.network in ("rho1.50", "rho3.49")][:3]
    model = train_surrogate(frames, a_c_dataset.grid, {"type": "descriptor"},
                            {"n_members": 4, "hidden": [32]},
                            {"max_epochs": 6, "min_epochs": 1, "batch_sites": 128})
    held = next(f for f in a_c_dataset.frames if f.network == "rho2.49")
    members = model.mean_spectrum(*_tensors(held.atoms))
    assert members.shape == (4, 100) and (members.std(0) > 0).any()
    assert not any(p.requires_grad for p in model.parameters())
    gnn = train_surrogate(frames[:2], a_c_dataset.grid, {"type": "gnn_scratch", "width": 16,
                                                          "n_layers": 1},
                          {"n_members": 2, "hidden": [16]}, {"max_epochs": 2, "min_epochs": 1})
    assert gnn.site_spectra(*_tensors(held.atoms)).shape == (2, 216, 100)


def test_stop_rule_uses_training_loss_plateau():
    from xanesdiff.forward.training import HeadTrainConfig, StopRule

    rule = StopRule(HeadTrainConfig(max_epochs=100, min_epochs=5, patience=3, tol=0.01))
    stops = [rule.update(loss) for loss in [5, 4, 3, 2, 1.5, 1.2, 1.0]]
    assert not any(stops)
    stops = [rule.update(1.0) for _ in range(3)]
    assert stops[-1] and not stops[0]


def test_feature_cache_reuses_and_invalidates(tmp_path, frame):
    from xanesdiff.forward.descriptor import RadialAngularDescriptor
    from xanesdiff.forward.m3gnet_features import FeatureCache

    cache = FeatureCache(RadialAngularDescriptor(), tmp_path)
    first = cache(frame.atoms)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = FeatureCache(RadialAngularDescriptor(), tmp_path)(frame.atoms)
    torch.testing.assert_close(first, again)
    moved = frame.atoms.copy()
    moved.positions[0] += 0.05
    FeatureCache(RadialAngularDescriptor(), tmp_path)(moved)
    FeatureCache(RadialAngularDescriptor(n_radial=10), tmp_path)(frame.atoms)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass while `fn()` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_backbone_pass_matches_matgl_and_recompute_saves_memory(surrogate, frame):
    """Our M3GNet pass equals matgl's own forward; recomputing blocks in the backward pass gives
    the same gradient while keeping far fewer tensors alive between forward and backward."""
    featurizer = copy_of_m3gnet_part(surrogate)
    pos, cell, numbers = _tensors(frame.atoms)
    matgl_layers, _ = _matgl_layers(featurizer, pos, cell, numbers)
    with torch.no_grad():
        matgl_features = torch.cat([matgl_layers[f"gc_{k}"]["node_feat"] for k in (1, 2, 3)],
                                   dim=1)
        torch.testing.assert_close(featurizer(pos, cell, numbers), matgl_features,
                                   atol=1e-6, rtol=1e-6)
    weights = torch.randn(216, featurizer.feature_dim, generator=torch.Generator().manual_seed(0))
    grads, saved = {}, {}
    for min_atoms in (10**9, 1):
        featurizer.recompute_min_atoms = min_atoms
        x = pos.clone().requires_grad_(True)
        holder = {}
        saved[min_atoms] = _saved_bytes(
            lambda: holder.setdefault("loss", (featurizer(x, cell, numbers) * weights).sum()))
        (grads[min_atoms],) = torch.autograd.grad(holder["loss"], x)
    torch.testing.assert_close(grads[1], grads[10**9], atol=1e-4, rtol=1e-4)  # float32 sums
    assert saved[1] < 0.5 * saved[10**9], saved
    # by default the machine's memory decides: never for a small cell, always for a huge one
    featurizer.recompute_min_atoms = None
    assert not featurizer.recomputes(216) and featurizer.recomputes(10**7)


def _matgl_layers(featurizer, pos, cell, numbers):
    """matgl's own M3GNet forward on our neighbour graph: its per-layer features
    (`feature_dict`) and the graph's edge_index."""
    from types import SimpleNamespace

    edge_index, shifts = featurizer.neighbor_graph(pos, cell)
    graph = SimpleNamespace(node_type=featurizer._type_of_z[numbers], pos=pos,
                            edge_index=edge_index, pbc_offshift=shifts @ cell, batch=None,
                            num_graphs=1)
    with torch.no_grad():
        featurizer.m3gnet(g=graph)
    return featurizer.m3gnet.feature_dict, edge_index


def copy_of_m3gnet_part(surrogate):
    import copy

    (part,) = [p for p in surrogate.featurizer.parts if type(p).__name__ == "M3GNetFeaturizer"]
    return copy.deepcopy(part)


def _bonds(featurizer, atoms):
    pos, cell, numbers = _tensors(atoms)
    edge_index, shifts = featurizer.neighbor_graph(pos, cell)
    distance = (pos[edge_index[1]] + shifts @ cell - pos[edge_index[0]]).norm(dim=1)
    return pos, cell, numbers, edge_index, shifts, distance


def test_three_body_pairs_are_matgls_line_graph(surrogate, frame):
    """Our vectorised pair enumeration lists exactly matgl's three-body pairs, in its order,
    including where bonds beyond the three-body cutoff sit between kept ones."""
    from matgl.graph._compute import create_line_graph

    from xanesdiff.forward.m3gnet_features import three_body_pairs

    featurizer = copy_of_m3gnet_part(surrogate)
    pos, cell, _, edge_index, shifts, distance = _bonds(featurizer, frame.atoms)
    for cutoff in (featurizer.m3gnet.threebody_cutoff, 2.0):
        kept = distance <= cutoff
        assert 0 < kept.sum() < len(kept)
        theirs = create_line_graph(edge_index, distance, None, None, len(pos), cutoff)
        ours = three_body_pairs(edge_index[0], kept)
        assert ours.shape[1] > 0
        assert torch.equal(ours, theirs["line_edge_index"].long())


def test_spans_cover_the_cell_once_and_hold_their_pairs(surrogate, frame):
    """Spans are consecutive atom ranges with the bonds those atoms source, together covering
    every atom and bond once; each holds about the asked number of three-body pairs."""
    from xanesdiff.forward.m3gnet_features import three_body_spans

    featurizer = copy_of_m3gnet_part(surrogate)
    pos, _, _, edge_index, _, distance = _bonds(featurizer, frame.atoms)
    source, kept = edge_index[0], distance <= featurizer.m3gnet.threebody_cutoff
    per_atom = torch.bincount(source[kept], minlength=len(pos))
    pairs = per_atom * (per_atom - 1)
    budget = 5000
    spans = three_body_spans(source, kept, len(pos), budget)
    assert len(spans) == pytest.approx(int(pairs.sum()) / budget, abs=2)
    assert spans[0][0] == spans[0][2] == 0
    assert (spans[-1][1], spans[-1][3]) == (edge_index.shape[1], len(pos))
    for (_, bond_stop, _, atom_stop), (bond_start, _, atom_start, _) in zip(spans, spans[1:]):
        assert (bond_stop, atom_stop) == (bond_start, atom_start)
    for bond_start, bond_stop, atom_start, atom_stop in spans:
        assert ((source[bond_start:bond_stop] >= atom_start)
                & (source[bond_start:bond_stop] < atom_stop)).all()
        assert int(pairs[atom_start:atom_stop].sum()) <= budget + int(pairs.max())
    assert len(three_body_spans(source, kept, len(pos), budget, max_spans=4)) <= 4
    assert len(three_body_spans(source, kept, len(pos), budget, max_spans=1)) == 1


def test_backbone_in_spans_gives_the_same_features_and_gradients(surrogate, frame):
    """Running M3GNet's blocks span by span (validation's bounded-memory pass; recomputed
    spans under a gradient) changes neither the features nor their gradient in positions."""
    from xanesdiff.forward.m3gnet_features import backbone_blocks

    featurizer = copy_of_m3gnet_part(surrogate)
    pos, cell, numbers, edge_index, shifts, _ = _bonds(featurizer, frame.atoms)
    node_type = featurizer._type_of_z[numbers]

    def blocks(x, **options):
        return backbone_blocks(featurizer.m3gnet, x, shifts @ cell, edge_index, node_type,
                               n_blocks=3, **options)

    with torch.no_grad():
        whole, spans = blocks(pos), blocks(pos, pairs_per_span=3000)
    for name in ("gc_1", "gc_2", "gc_3"):
        for ours, reference in zip(spans[name], whole[name]):
            torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
    weights = torch.randn(216, 64, generator=torch.Generator().manual_seed(1))
    grads = []
    for options in ({}, {"recompute": True, "pairs_per_span": 3000}):
        x = pos.clone().requires_grad_(True)
        loss = (blocks(x, **options)["gc_3"][0] * weights).sum()
        grads.append(torch.autograd.grad(loss, x)[0])
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_edge_layers_are_matgls_edge_features_averaged_per_atom(surrogate, frame):
    """`edge_gc_k` layers (kept edge features, concatenated over spans) are the mean over each
    atom's bonds of matgl's own edge features after block k."""
    from xanesdiff.forward.m3gnet_features import M3GNetFeaturizer

    featurizer = M3GNetFeaturizer(copy_of_m3gnet_part(surrogate).model_dir,
                                  layers=("gc_1", "edge_gc_2"))
    pos, cell, numbers = _tensors(frame.atoms)
    matgl_layers, edge_index = _matgl_layers(featurizer, pos, cell, numbers)
    with torch.no_grad():
        edges = matgl_layers["gc_2"]["edge_feat"]
        counts = torch.bincount(edge_index[0], minlength=216).unsqueeze(1)
        expected = torch.cat([
            matgl_layers["gc_1"]["node_feat"],
            torch.zeros(216, edges.shape[1]).index_add(0, edge_index[0], edges) / counts], dim=1)
        torch.testing.assert_close(featurizer(pos, cell, numbers), expected, atol=1e-5, rtol=1e-5)
