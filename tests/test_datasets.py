"""Foundation: asset resolution, dataset validation, network splits, periodic graphs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

from xanesdiff.datasets.assets import MissingAssetError, resolve_asset
from xanesdiff.datasets.dataset import A_C_GRID, load_dataset, load_frame
from xanesdiff.datasets.energy_grid import EnergyGrid
from xanesdiff.datasets.errors import XanesdiffInputError
from xanesdiff.datasets.graph import (atoms_to_graph, collate, edge_vectors,
                                      periodic_neighbor_list, wrap_positions)
from xanesdiff.datasets.splits import leave_one_density_out, leave_one_network_out

GRID = EnergyGrid.from_dict(A_C_GRID)


def random_triclinic_atoms(rng, n_max=24, edge=(2.2, 7.0)) -> Atoms:
    cell = np.diag(rng.uniform(*edge, size=3)) + rng.normal(0.0, 0.8, (3, 3))
    if np.linalg.det(cell) < 0:
        cell[0] *= -1
    n = int(rng.integers(1, n_max))
    return Atoms(f"C{n}", scaled_positions=rng.uniform(0, 1, (n, 3)), cell=cell, pbc=True)


@pytest.mark.parametrize("seed", range(12))
def test_periodic_graph_matches_ase_on_random_triclinic_cells(seed):
    rng = np.random.default_rng(seed)
    atoms = random_triclinic_atoms(rng)
    cutoff = float(rng.uniform(2.0, 5.0))  # often larger than half the cell: several images
    i, j, shifts, dist = periodic_neighbor_list(atoms.positions, atoms.cell.array, cutoff)
    ia, ja, sa, da = neighbor_list("ijSd", atoms, cutoff)
    ours = sorted(zip(i.tolist(), j.tolist(), map(tuple, shifts.tolist())))
    theirs = sorted(zip(ia.tolist(), ja.tolist(), map(tuple, sa.tolist())))
    assert ours == theirs
    graph = atoms_to_graph(atoms, cutoff)
    vec = edge_vectors(graph.pos.double(), graph.cell.double(), graph.edge_index,
                       graph.edge_shift.double())
    np.testing.assert_allclose(np.sort(vec.norm(dim=1).numpy()), np.sort(da), atol=1e-5)


def test_small_cell_counts_every_image():
    """One atom in a 2 Å cubic cell with a 4.1 Å cutoff sees its own images: 6 at 2 Å, 12 at
    2.83 Å, 8 at 3.46 Å, 6 at 4 Å = 32 neighbours."""
    atoms = Atoms("C", positions=[[0.3, 0.2, 0.1]], cell=np.eye(3) * 2.0, pbc=True)
    i, j, shifts, dist = periodic_neighbor_list(atoms.positions, atoms.cell.array, 4.1)
    assert len(i) == 32 and np.all(i == 0) and np.all(j == 0)


def test_batched_edge_vectors_use_each_graphs_cell():
    rng = np.random.default_rng(3)
    a, b = random_triclinic_atoms(rng), random_triclinic_atoms(rng)
    batch = collate([atoms_to_graph(a, 3.0), atoms_to_graph(b, 3.0)])
    vec = edge_vectors(batch.pos, batch.cell, batch.edge_index, batch.edge_shift, batch.batch)
    expected = np.concatenate([neighbor_list("d", x, 3.0) for x in (a, b)])
    np.testing.assert_allclose(np.sort(vec.norm(dim=1).numpy()), np.sort(expected), atol=1e-4)


def test_wrap_positions_is_idempotent_and_inside_cell():
    rng = np.random.default_rng(4)
    atoms = random_triclinic_atoms(rng)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)
    pos = torch.tensor(atoms.positions) + torch.randn(len(atoms), 3, dtype=torch.float64) * 10
    wrapped = wrap_positions(pos, cell)
    frac = torch.linalg.solve(cell.T, wrapped.T).T
    assert (frac >= -1e-9).all() and (frac < 1 + 1e-9).all()
    torch.testing.assert_close(wrap_positions(wrapped, cell), wrapped)


def test_dataset_loads_five_networks(a_c_dataset):
    assert len(a_c_dataset) == 25
    densities = [round(a_c_dataset.network_density(n), 1) for n in a_c_dataset.networks]
    assert densities == [1.5, 2.0, 2.5, 3.0, 3.5]
    counts = [len(a_c_dataset.frames_of([n])) for n in a_c_dataset.networks]
    assert counts == [12, 3, 4, 3, 3]
    frame = a_c_dataset.frames[0]
    assert frame.site_spectra.shape == (216, 100)


def test_splits_never_share_a_network(a_c_dataset):
    splits = leave_one_network_out(a_c_dataset)
    assert len(splits) == 5
    for split in splits:
        train_networks = {f.network for f in split.train}
        test_networks = {f.network for f in split.test}
        assert test_networks == {split.held_out_network}
        assert not train_networks & test_networks
        assert len(split.train) + len(split.test) == len(a_c_dataset)
        # Snapshots are re-ordered copies: the held-out cell appears nowhere in training.
        held_cell = split.test[0].atoms.cell.array
        assert all(np.abs(f.atoms.cell.array - held_cell).max() > 1e-3 for f in split.train)
    split = leave_one_density_out(a_c_dataset, 2.5)
    assert {round(f.density_g_cm3, 1) for f in split.test} == {2.5}
    with pytest.raises(ValueError, match="available"):
        leave_one_density_out(a_c_dataset, 4.2)


@pytest.fixture
def good_pair(assets_root, tmp_path):
    src = assets_root / "data" / "a-C"
    structure = tmp_path / "s.vasp"
    structure.write_text((src / "structures" / "d2.0_1.vasp").read_text())
    lines = (src / "spectra" / "d2.0_1.txt").read_text().splitlines()
    return structure, lines, tmp_path


MALFORMED = {
    "too few rows": (lambda lines: lines[:-1], "215 spectrum rows but the structure has 216"),
    "empty": (lambda lines: [], "empty"),
    "nan": (lambda lines: [lines[0].replace("0.0000", "nan", 1)] + lines[1:], "non-finite"),
    "non-numeric": (lambda lines: lines[:5] + [lines[5].replace("0.0000", "abc", 1)] + lines[6:],
                    "line 6: non-numeric value 'abc'"),
    "ragged": (lambda lines: lines[:9] + [" ".join(lines[9].split()[:-1])] + lines[10:],
               "line 10: 99 columns, expected 100"),
    "negative": (lambda lines: [lines[0].replace("0.0000", "-0.5000", 1)] + lines[1:],
                 "negative intensity"),
    "wrong grid": (lambda lines: [" ".join(l.split()[:90]) for l in lines],
                   "90 energy columns, expected 100"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_spectra_files_name_file_and_problem(good_pair, kind):
    structure, lines, tmp_path = good_pair
    mutate, expected = MALFORMED[kind]
    bad = tmp_path / f"bad_{kind.replace(' ', '_')}.txt"
    bad.write_text("\n".join(mutate(lines)) + "\n")
    with pytest.raises(XanesdiffInputError) as err:
        load_frame(structure, bad, GRID)
    assert str(bad) in str(err.value) and expected in str(err.value)


def test_good_pair_loads(good_pair):
    structure, lines, tmp_path = good_pair
    spectra = tmp_path / "ok.txt"
    spectra.write_text("\n".join(lines))
    frame = load_frame(structure, spectra, GRID)
    assert frame.site_spectra.shape == (216, 100) and abs(frame.density_g_cm3 - 2.0) < 0.01


@pytest.mark.parametrize("kind,content,expected", [
    ("garbage", "this is not a structure\n", "could not be read"),
    ("overlap", "overlap", "overlapping atoms"),
    ("no cell", "nocell", "no 3D periodic cell"),
])
def test_malformed_structure_files(tmp_path, kind, content, expected):
    from xanesdiff.datasets.structures import read_structures
    import ase.io

    path = tmp_path / f"{kind.replace(' ', '_')}.extxyz"
    if content == "overlap":
        ase.io.write(path, Atoms("C2", positions=[[0, 0, 0], [0.2, 0, 0]], cell=np.eye(3) * 5,
                                 pbc=True))
    elif content == "nocell":
        ase.io.write(path, Atoms("C2", positions=[[0, 0, 0], [1.5, 0, 0]]))
    else:
        path.write_text(content)
    with pytest.raises(XanesdiffInputError) as err:
        read_structures(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_asset_resolution_order(tmp_path, monkeypatch):
    env_root, cache_root = tmp_path / "env", tmp_path / "cache"
    (env_root / "models" / "m").mkdir(parents=True)
    (cache_root / "xanesdiff" / "models" / "m").mkdir(parents=True)
    (cache_root / "xanesdiff" / "models" / "only-cache").mkdir(parents=True)
    monkeypatch.setenv("XANESDIFF_ASSETS", str(env_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    assert resolve_asset("models/m", explicit) == explicit.resolve()
    assert resolve_asset("models/m") == (env_root / "models" / "m").resolve()
    assert resolve_asset("models/only-cache") == (cache_root / "xanesdiff" / "models" /
                                                  "only-cache").resolve()
    with pytest.raises(MissingAssetError) as err:
        resolve_asset("models/absent")
    message = str(err.value)
    assert str(env_root / "models" / "absent") in message and "matgl" in message
    with pytest.raises(MissingAssetError, match="does not exist"):
        resolve_asset("models/m", tmp_path / "nowhere")


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XANESDIFF_ASSETS", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    with pytest.raises(MissingAssetError, match="data/a-C"):
        load_dataset()


def test_networks_at_densities_and_a_density_matching_none(a_c_dataset):
    from xanesdiff.datasets.errors import XanesdiffInputError

    assert a_c_dataset.networks_at([2.0, 3.5]) == ["rho2.00", "rho3.49"]
    with pytest.raises(XanesdiffInputError, match="density 2.7 matches 0 networks") as err:
        a_c_dataset.networks_at([2.7], field="data.exclude_densities")
    assert "data.exclude_densities" in str(err.value)
