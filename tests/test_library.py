"""Structure libraries: plan expansion, kill/resume through a real signal, determinism, shards
(hydra multirun) + merge, filters and near-duplicates, export. Tiny models: seconds per item."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from guidance_toys import TOY_GRID, ToySurrogate, random_carbon, tiny_prior
from xanesdiff.datasets.errors import XanesdiffInputError

TESTS_DIR = Path(__file__).resolve().parent
N_ATOMS = 24


def make_models(seed: int = 0) -> dict:
    """Model factory for `models.factory=test_library:make_models` (also used by subprocesses)."""
    return {"prior": tiny_prior(seed, dtype=torch.float32), "surrogate": ToySurrogate()}


def make_models_with_record(seed: int = 0) -> dict:
    """`make_models` whose prior's benchmark missed its sp3 target at 2.3 g/cm³."""
    from xanesdiff.diffusion.fidelity_record import FidelityRecord

    models = make_models(seed)
    models["prior"].fidelity = FidelityRecord(
        per_density={"2.30": {"sp3_err": {"value": 0.09, "limit": 0.05}}, "3.00": {}})
    return models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread is several times faster (and subprocesses get the
    same count, so their structures compare bit for bit with in-process ones)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target_file(tmp_path_factory) -> Path:
    """A two-column spectrum on the toy grid: the toy surrogate's prediction of a random cell."""
    surrogate = ToySurrogate()
    pos, cell, numbers = random_carbon(N_ATOMS, seed=5)
    spectrum = surrogate.mean_spectrum(pos, cell, numbers).mean(0).detach().numpy()
    path = tmp_path_factory.mktemp("targets") / "target.txt"
    np.savetxt(path, np.column_stack([TOY_GRID.energies_eV, spectrum]))
    return path


def overrides(out: Path, target: Path, **extra) -> list[str]:
    """A 6-item plan: one target × two densities × three seeds; permissive filters."""
    base = {
        "out": str(out), "models.factory": "test_library:make_models",
        "plan.targets": f"[{target}]", "plan.densities": "[2.4,2.7]", "plan.steers": "[null]",
        "plan.n_seeds": "3", "plan.n_atoms": f"[{N_ATOMS}]",
        "sampler": "em", "sampler.n_steps": "8", "sampler.final_corrector_steps": "1",
        "filters.max.cn1": "null", "filters.max.cn5plus": "null",
        "filters.min.min_distance_A": "null", "progress": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def compose(name: str, args: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("xanesdiff.configs", version_base="1.3"):
        return hydra_compose(name, overrides=args)


def build(args: list[str]) -> dict:
    from xanesdiff.library.runner import build_library

    return build_library(compose("library", args), progress=False)


def rows_by_key(db: Path) -> dict:
    import ase.db

    return {r.unique_id: r for r in ase.db.connect(str(db), type="db",
                                                   use_lock_file=False).select()}


def planned_keys(args: list[str]) -> list[str]:
    from xanesdiff.library.runner import plan_items

    return [i.key for i in plan_items(compose("library", args))]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xanesdiff.scripts.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["XANESDIFF_THREADS"] = "1"
    return env


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM systems").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, target_file):
    """An uninterrupted single-process library of the 6-item plan."""
    out = tmp_path_factory.mktemp("reference")
    args = overrides(out, target_file)
    summary = build(args)
    return {"out": out, "db": out / "library.db", "args": args, "summary": summary,
            "keys": planned_keys(args)}


# -- plan ------------------------------------------------------------------------------------

def test_plan_expansion_keys_shards_and_errors(tmp_path, target_file):
    from xanesdiff.library.plan import expand_plan, shard_db_url, shard_items

    plan = {"targets": [str(target_file), None], "densities": [2.0, 2.5],
            "steers": ["pi_star_up", ["pi_star_down", "pi_sigma_ratio"]], "n_atoms": [24],
            "seeds": [3, 1]}
    items = expand_plan(plan)
    assert len(items) == 2 * 2 * 2 * 2
    assert [i.seed for i in items[:2]] == [3, 1]  # seeds innermost, order kept
    assert items[2].steer == ("pi_star_down", "pi_sigma_ratio")
    assert [i.key for i in expand_plan(plan)] == [i.key for i in items]  # stable
    assert len({i.key for i in items}) == len(items)
    # the key follows the target's content, not its path
    moved = tmp_path / "elsewhere.dat"
    moved.write_bytes(target_file.read_bytes())
    assert expand_plan({**plan, "targets": [str(moved)]})[0].key == items[0].key
    # repeated entries collapse to one item
    assert len(expand_plan({**plan, "seeds": [1, 1]})) == len(items) // 2
    # shards partition the plan
    shards = [shard_items(items, k, 3) for k in range(3)]
    assert sorted(i.key for s in shards for i in s) == sorted(i.key for i in items)
    assert shard_db_url("runs/x/lib.db", 1, 3) == "runs/x/lib_shard1of3.db"
    assert shard_db_url("postgresql://h/db", 1, 3) == "postgresql://h/db"

    # a plan file (paths relative to it) expands like the same plan given inline
    from xanesdiff.library.runner import plan_items

    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "target.txt").write_bytes(target_file.read_bytes())
    (tmp_path / "plans" / "plan.yaml").write_text(
        "plan:\n  targets: [target.txt, null]\n  densities: [2.0, 2.5]\n"
        "  steers: [pi_star_up, [pi_star_down, pi_sigma_ratio]]\n  n_atoms: [24]\n"
        "  seeds: [3, 1]\n")
    from_file = plan_items(compose("library", [f"plan_file={tmp_path / 'plans' / 'plan.yaml'}"]))
    assert [i.key for i in from_file] == [i.key for i in items]

    bad = [({**plan, "steers": ["no_such_steer"]}, "no steer named 'no_such_steer'"),
           ({**plan, "targets": [str(tmp_path / "missing.csv")]}, "does not exist"),
           ({**plan, "seeds": None, "n_seeds": 0}, "expands to no items"),
           ({**plan, "densities": [9.0]}, "density 9.0"),
           ({**plan, "densities": ["dense"]}, "not a number"),
           ({**plan, "targets": [None], "steers": [None]}, "nothing to guide on"),
           ({**plan, "n_atoms": [1]}, "at least 2"),
           ({**plan, "colour": "red"}, "unknown field")]
    for case, message in bad:
        with pytest.raises(XanesdiffInputError, match=message):
            expand_plan(case)


# -- kill, resume, determinism ---------------------------------------------------------------

def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cli("library", *args), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, db: Path, at_least: int, sig) -> int:
    deadline = time.time() + 120
    while count_rows(db) < at_least:
        if proc.poll() is not None:
            pytest.fail(f"library exited early ({proc.returncode}):\n{proc.stdout.read()}")
        assert time.time() < deadline, "no row written within 120 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    return count_rows(db)


def test_killed_library_resumes_without_repeats_or_partial_rows(tmp_path, target_file,
                                                                reference):
    out = tmp_path / "lib"
    db = out / "library.db"
    args = overrides(out, target_file)
    planned = reference["keys"]

    after_kill = _kill_when(_start(args), db, 1, signal.SIGKILL)
    assert 1 <= after_kill < len(planned), "the kill must land mid-run"
    first_rows = {k: r.id for k, r in rows_by_key(db).items()}
    after_term = _kill_when(_start(args), db, after_kill + 1, signal.SIGTERM)
    assert after_kill < after_term
    done = subprocess.run(cli("library", *args), env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(out.glob("*.lock"))

    rows = rows_by_key(db)
    assert sorted(rows) == sorted(planned)  # every planned item, each exactly once
    assert count_rows(db) == len(planned)
    assert all(rows[k].id == i for k, i in first_rows.items())  # finished rows untouched
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for key, row in rows.items():
        assert row.natoms == N_ATOMS and row.status in ("accepted", "rejected")
        assert row.target == target_file.name and row.target_sha256.startswith("sha256:")
        assert row.model_factory == "test_library:make_models"
        assert row.prior_sha256.startswith("sha256:") and row.xanesdiff_version
        for metric in ("mae", "spearman", "cosine", "sp", "sp2", "sp3", "cn1",
                       "min_distance_A"):
            assert np.isfinite(row[metric])
        assert row.data["predicted"].shape == (TOY_GRID.n_points,)
        assert row.data["site_spectra"].shape == (N_ATOMS, TOY_GRID.n_points)
        provenance = row.data["provenance"]
        assert provenance["item"]["key"] == key
        assert provenance["settings"]["sampler"]["n_steps"] == 8
        assert provenance["versions"]["xanesdiff"] == row.xanesdiff_version

    # killed and resumed in three processes = one uninterrupted run
    ref = rows_by_key(reference["db"])
    for key, row in rows.items():
        np.testing.assert_array_equal(row.positions, ref[key].positions)
        assert row.status == ref[key].status
    # a further rerun has nothing left to do
    again = build(args)
    assert again["generated_now"] == {"accepted": 0, "rejected": 0}
    assert again["missing"] == 0 and count_rows(db) == len(planned)


def test_same_plan_and_seeds_give_the_same_structures(tmp_path, reference, target_file):
    out = tmp_path / "again"
    build(overrides(out, target_file))
    a, b = rows_by_key(reference["db"]), rows_by_key(out / "library.db")
    assert sorted(a) == sorted(b) == sorted(reference["keys"])
    for key in a:
        np.testing.assert_array_equal(a[key].positions, b[key].positions)
        np.testing.assert_array_equal(a[key].data["predicted"], b[key].data["predicted"])
    # different seeds give different structures
    seeds = [a[k].positions for k in reference["keys"][:2]]
    assert np.abs(seeds[0] - seeds[1]).max() > 0.1


def test_other_settings_are_refused_on_the_same_database(reference, target_file):
    args = overrides(reference["out"], target_file, **{"sampler.n_steps": 9})
    with pytest.raises(XanesdiffInputError, match="different settings"):
        build(args)


# -- shards ----------------------------------------------------------------------------------

def test_multirun_shards_merge_into_the_single_run_library(tmp_path, reference, target_file):
    from xanesdiff.scripts.library_merge import run as merge

    out = tmp_path / "sharded"
    args = [a for a in overrides(out, target_file) if not a.startswith("progress")]
    proc = subprocess.run(cli("library", "-m", "shard_index=0,1", "n_shards=2", *args),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shard_dbs = [out / "library_shard0of2.db", out / "library_shard1of2.db"]
    shard_keys = [set(rows_by_key(p)) for p in shard_dbs]
    assert all(shard_keys) and not shard_keys[0] & shard_keys[1]
    assert not (out / "library.db").exists()

    counts = merge(compose("library_merge", [f"out={out}", "n_shards=2"]))
    assert counts["written"] == len(reference["keys"]) and counts["missing"] == 0
    assert counts["skipped_existing"] == counts["skipped_duplicate_key"] == 0
    merged = rows_by_key(out / "library.db")
    ref = rows_by_key(reference["db"])
    assert sorted(merged) == sorted(ref)
    assert count_rows(out / "library.db") == len(ref)
    for key in ref:
        np.testing.assert_array_equal(merged[key].positions, ref[key].positions)
        assert merged[key].status == ref[key].status
    # merged rows come in plan order, like a single run
    assert [r.item_index for r in sorted(merged.values(), key=lambda r: r.id)] == \
        sorted(r.item_index for r in merged.values())

    # merging again writes nothing; a shard listed twice is counted, not copied
    again = merge(compose("library_merge", [f"out={out}",
                                            f"inputs=[{shard_dbs[0]},{shard_dbs[1]}]"]))
    assert again["written"] == 0 and again["skipped_existing"] == len(ref)
    fresh = merge(compose("library_merge", [f"db={tmp_path / 'twice.db'}",
                                            f"inputs=[{shard_dbs[0]},{shard_dbs[0]}]"]))
    assert fresh["written"] == len(shard_keys[0])
    assert fresh["skipped_duplicate_key"] == len(shard_keys[0])
    assert fresh["missing"] == len(shard_keys[1])
    # the merged database resumes as a single-run library: nothing left to generate
    resumed = build(overrides(out, target_file))
    assert resumed["generated_now"] == {"accepted": 0, "rejected": 0}
    with pytest.raises(XanesdiffInputError, match="missing"):
        merge(compose("library_merge", [f"out={out}", "n_shards=3"]))


# -- filters and duplicates ------------------------------------------------------------------

def test_thresholds_and_near_duplicates_are_rejected_with_reasons(tmp_path, target_file):
    # the same spectrum in a second file (a comment line differs): other items, same structures
    copy = tmp_path / "target_copy.txt"
    copy.write_text("# the same spectrum again\n" + target_file.read_text())
    plan = {"plan.targets": f"[{target_file},{copy}]", "plan.densities": "[2.5]",
            "plan.n_seeds": "2"}

    strict = tmp_path / "strict"
    summary = build(overrides(strict, target_file, **plan, **{"filters.max.mae": 0.0}))
    assert summary["rejected"] == 4 and summary["rejected_by"] == {"mae": 4}
    for row in rows_by_key(strict / "library.db").values():
        assert row.status == "rejected" and row.reason.startswith("mae ")
        assert "> max 0" in row.reason
    # rejected items count as done: a rerun does not redo them
    rerun = build(overrides(strict, target_file, **plan, **{"filters.max.mae": 0.0}))
    assert rerun["generated_now"] == {"accepted": 0, "rejected": 0}

    dedup = tmp_path / "dedup"
    summary = build(overrides(dedup, target_file, **plan))
    rows = sorted(rows_by_key(dedup / "library.db").values(), key=lambda r: r.item_index)
    assert [r.status for r in rows] == ["accepted", "accepted", "rejected", "rejected"]
    for original, duplicate in zip(rows[:2], rows[2:]):
        assert duplicate.target == copy.name and duplicate.duplicate_of == original.unique_id
        assert duplicate.duplicate_distance_A < 1e-6
        assert duplicate.reason.startswith("near-duplicate of " + original.unique_id)
    assert summary["rejected_by"] == {"near-duplicate": 2}

    nodedup = tmp_path / "nodedup"
    assert build(overrides(nodedup, target_file, **plan, **{"dedup.enabled": False}))[
        "accepted"] == 4


def test_fingerprint_is_invariant_and_separates_structures():
    from ase import Atoms

    from xanesdiff.library.fingerprint import (DEFAULT_THRESHOLD_A, DuplicateIndex,
                                               fingerprint_distance,
                                               local_environment_fingerprint as fingerprint)

    pos, cell, numbers = random_carbon(40, density_g_cm3=2.5, seed=1)
    atoms = Atoms(numbers=numbers.numpy(), positions=pos.numpy(), cell=cell.numpy(), pbc=True)
    rng = np.random.default_rng(0)
    moved = atoms[rng.permutation(len(atoms))]
    moved.translate([0.7, -0.2, 1.3])
    moved.wrap()
    rotated = atoms.copy()
    rotated.rotate(90, "z", rotate_cell=True)
    noisy = atoms.copy()
    noisy.positions += rng.normal(0, 0.004, noisy.positions.shape)
    other = Atoms(numbers=numbers.numpy(), cell=cell.numpy(), pbc=True,
                  positions=random_carbon(40, density_g_cm3=2.5, seed=2)[0].numpy())
    base = fingerprint(atoms)
    assert base.shape == (40, 8) and (np.diff(base, axis=1) >= 0).all()
    assert fingerprint_distance(base, fingerprint(moved)) < 1e-5
    assert fingerprint_distance(base, fingerprint(rotated)) < 1e-5
    assert fingerprint_distance(base, fingerprint(noisy)) < DEFAULT_THRESHOLD_A
    assert fingerprint_distance(base, fingerprint(other)) > 5 * DEFAULT_THRESHOLD_A

    index = DuplicateIndex()
    index.add("a", 40, 2.5, base)
    assert index.find(40, 2.5, fingerprint(noisy))[0] == "a"
    assert index.find(40, 2.5, fingerprint(other)) is None
    assert index.find(40, 2.7, fingerprint(noisy)) is None  # another cell: not compared


def test_filter_config_and_threshold_reasons():
    from xanesdiff.library.filters import check_filter_config, threshold_failures

    filters = check_filter_config({"max": {"cn1": 0.1, "mae": None}, "min": {"spearman": 0.9}})
    assert filters == {"max": {"cn1": 0.1}, "min": {"spearman": 0.9}}
    assert threshold_failures({"cn1": 0.05, "spearman": 0.95}, filters) == []
    assert threshold_failures({"cn1": 0.2, "spearman": float("nan")}, filters) == [
        "cn1 0.2 > max 0.1", "spearman nan < min 0.9"]
    assert threshold_failures({}, filters) == []  # metrics an item lacks are not checked
    with pytest.raises(XanesdiffInputError, match="unknown metric 'colour'"):
        check_filter_config({"max": {"colour": 1}})


# -- export ----------------------------------------------------------------------------------

def test_export_extxyz_poscars_and_site_spectra(tmp_path, reference):
    import ase.io

    from xanesdiff.datasets.spectra_io import read_site_spectra, read_spectra_csv
    from xanesdiff.scripts.library import run

    out = tmp_path / "export"
    args = [a for a in reference["args"]] + [f"export.out={out}", "mode=export"]
    counts = run(compose("library", args))
    rows = rows_by_key(reference["db"])
    accepted = {k: r for k, r in rows.items() if r.status == "accepted"}
    assert counts["rows"] == len(accepted) > 0
    frames = ase.io.read(out / "structures.extxyz", ":")
    assert [f.info["item_key"] for f in frames] == sorted(
        accepted, key=lambda k: accepted[k].item_index)
    for frame in frames:
        row = accepted[frame.info["item_key"]]
        np.testing.assert_allclose(frame.positions, row.positions, atol=1e-6)
        assert frame.info["seed"] == row.seed and frame.info["status"] == "accepted"
    poscars = sorted((out / "poscar").glob("*.vasp"))
    assert [p.stem for p in poscars] == sorted(accepted)
    back = ase.io.read(poscars[0], format="vasp")
    np.testing.assert_allclose(back.get_scaled_positions(),
                               accepted[poscars[0].stem].toatoms().get_scaled_positions(),
                               atol=1e-6)
    key = next(iter(accepted))
    sites = read_site_spectra(out / "site_spectra" / f"{key}.csv", n_sites=N_ATOMS,
                              n_energies=TOY_GRID.n_points)
    np.testing.assert_allclose(sites, accepted[key].data["site_spectra"], rtol=1e-5)
    energy, columns = read_spectra_csv(out / "site_spectra" / "mean_spectra.csv")
    np.testing.assert_allclose(energy, TOY_GRID.energies_eV, rtol=1e-9)
    np.testing.assert_allclose(columns[key], accepted[key].data["predicted"], rtol=1e-5)
    index = (out / "index.csv").read_text().splitlines()
    assert index[0].startswith("item_key,") and len(index) == len(accepted) + 1
    with pytest.raises(XanesdiffInputError, match="no relaxed positions"):
        run(compose("library", args + ["export.positions=relaxed"]))

    summary = run(compose("library", reference["args"] + ["mode=summary"]))
    assert summary["planned"] == summary["done"] == len(reference["keys"])
    assert summary["missing"] == 0


def test_diverged_sampling_is_recorded_and_not_retried(tmp_path, target_file, monkeypatch):
    from xanesdiff.diffusion.samplers import NonFiniteSampleError
    from xanesdiff.guidance.pipeline import GuidedGenerator

    original = GuidedGenerator.generate

    def diverge_on_seed_1(self, density_g_cm3, seed, guided=True, cell_A=None):
        if seed == 1 and guided:
            raise NonFiniteSampleError("non-finite positions for 3 atoms at t=0.2")
        return original(self, density_g_cm3, seed, guided, cell_A)

    monkeypatch.setattr(GuidedGenerator, "generate", diverge_on_seed_1)
    args = overrides(tmp_path / "lib", target_file, **{"plan.densities": "[2.5]",
                                                      "plan.n_seeds": 2})
    summary = build(args)
    rows = {r.seed: r for r in rows_by_key(tmp_path / "lib" / "library.db").values()}
    assert summary["done"] == 2 and rows[0].status == "accepted"
    assert rows[1].status == "rejected" and rows[1].natoms == 0
    assert rows[1].reason.startswith("sampling failed: non-finite positions")
    assert "NonFiniteSampleError" in rows[1].data["provenance"]["error"]
    monkeypatch.setattr(GuidedGenerator, "generate", original)
    assert build(args)["generated_now"] == {"accepted": 0, "rejected": 0}


def test_library_names_the_densities_where_the_prior_missed_its_targets(tmp_path, target_file):
    """2.4 g/cm³ lies within 0.25 of the record's missed 2.3, 2.7 is nearer its met 3.0."""
    summary = build(overrides(tmp_path, target_file, **{
        "models.factory": "test_library:make_models_with_record", "plan.n_seeds": 1}))
    assert list(summary["prior_fidelity"]) == ["2.4"]
    assert "sp3_err 0.090 (target ≤ 0.05)" in summary["prior_fidelity"]["2.4"]
    plain = build(overrides(tmp_path / "plain", target_file, **{"plan.n_seeds": 1}))
    assert list(plain["prior_fidelity"]) == [] and plain["settings_fidelity"] == {}
    ranged = build(overrides(tmp_path / "ranged", target_file, **{
        "plan.n_seeds": 1, "validated_g_cm3": "[1.5,2.5]", "validated_note": "checked there"}))
    assert list(ranged["settings_fidelity"]) == ["2.7"]  # 2.4 lies inside [1.5, 2.5]
    assert ranged["settings_fidelity"]["2.7"].endswith("not at 2.70: checked there")


def test_library_refuses_cells_whose_validation_would_not_fit_before_generating(
        tmp_path, target_file, monkeypatch):
    """As `generate` does: a planned cell whose validation would exceed the device's memory is
    refused, naming the key to change, before any item is generated."""
    import xanesdiff.guidance.validation as validation
    from xanesdiff.datasets.errors import XanesdiffInputError

    monkeypatch.setattr(validation, "prediction_mb",
                        lambda surrogate, n_atoms, volume_A3: 10.0 * n_atoms)
    monkeypatch.setattr("xanesdiff.runtime.device_memory_mb", lambda device=None: 1000.0)
    with pytest.raises(XanesdiffInputError, match=r"models\.surrogate=fast"):
        build(overrides(tmp_path, target_file, **{"plan.n_seeds": 1, "plan.n_atoms": "[216]"}))
    assert not any(tmp_path.rglob("*.db")) or rows_by_key(next(tmp_path.rglob("*.db"))) == {}


def test_library_models_accept_shipped_surrogate_names():
    from xanesdiff.library.models import load_models

    models = load_models({"surrogate": "fast", "judge": "judge"})
    assert models.provenance["surrogate"]["path"].endswith("forward_fast.pt")
    assert models.provenance["judge"]["path"].endswith("forward_judge.pt")
    assert models.surrogate.config["featurizer"]["type"] == "descriptor"
