"""End to end: `xanesdiff generate` with tiny models — outputs, report, resume, refusal, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from guidance_toys import tiny_prior

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny random prior and descriptor surrogates (guide and judge) saved as checkpoints."""
    from xanesdiff.datasets.dataset import A_C_GRID
    from xanesdiff.datasets.energy_grid import EnergyGrid
    from xanesdiff.diffusion.prior import save_prior
    from xanesdiff.forward.surrogate import build_surrogate

    folder = tmp_path_factory.mktemp("models")
    prior = tiny_prior(dtype=__import__("torch").float32)
    save_prior(folder / "prior.pt", prior.score_model, prior.schedule)
    grid = EnergyGrid.from_dict(A_C_GRID)
    featurizer = {"type": "descriptor", "cutoff_A": 3.0, "n_radial": 8, "n_angular": 6}
    for name, seed in (("guide", 0), ("judge", 1)):
        build_surrogate(featurizer, {"hidden": [16], "n_members": 2, "seed": seed},
                        grid).save(folder / f"{name}.pt")
    return folder


def run_generate(models: Path, out: Path, *overrides: str, check=True):
    env = {**os.environ, "XANESDIFF_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "xanesdiff.scripts.cli", "generate", f"out={out}",
           f"models.prior={models / 'prior.pt'}", f"models.surrogate={models / 'guide.pt'}",
           f"models.validator={models / 'guide.pt'}", f"models.judge={models / 'judge.pt'}", "n_atoms=32", "sampler.n_steps=3",
           "sampler.n_corrector=1", "sampler.final_corrector_steps=1",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_generate_writes_validated_structures_and_resumes(tiny_models, tmp_path):
    from xanesdiff.diffusion.fidelity_record import FidelityRecord, save_fidelity_record

    target = REPO / "examples" / "target_rho2.5.csv"
    out = tmp_path / "run"
    models = shutil.copytree(tiny_models, tmp_path / "models")  # this prior gets a record:
    save_fidelity_record(models / "prior.pt", FidelityRecord(  # its benchmark missed at 2.49
        per_density={"2.49": {"sp3_err": {"value": 0.2, "limit": 0.05}}, "3.00": {}}))
    run_generate(models, out, f"target={target}", "n=2", "density=2.5", "seed=7")
    frames = ase.io.read(out / "structures.extxyz", index=":")
    assert len(frames) == 2 and all(len(a) == 32 for a in frames)
    for key in ("mae", "spearman", "cosine", "judge_mae", "seed", "guided_steps"):
        assert key in frames[0].info, key
    assert [a.info["seed"] for a in frames] == [7, 8]
    report = json.loads((out / "report.json").read_text())
    assert report["density"] == {"given_g_cm3": 2.5}
    assert report["prior_fidelity"].startswith("at 2.49 g/cm³") and "sp3_err 0.200" in report[
        "prior_fidelity"]
    assert report["target"]["kind"] == "two_column"
    summary = report["summary"]
    assert {"mean_prediction_match", "judged_mean_match", "sp3", "cn1"} <= set(summary)
    for png in ("spectra.png", "structure.png"):
        assert (out / png).stat().st_size > 10_000
    energy, _ = np.loadtxt(out / "spectra.csv", delimiter=",", skiprows=1, unpack=True,
                           usecols=(0, 1))
    assert len(energy) == 100

    # Resume: asking for one more structure generates only that one, keeping the first two.
    before = (out / "samples" / "sample_000.extxyz").stat().st_mtime_ns
    run_generate(models, out, f"target={target}", "n=3", "density=2.5", "seed=7")
    assert (out / "samples" / "sample_000.extxyz").stat().st_mtime_ns == before
    assert len(ase.io.read(out / "structures.extxyz", index=":")) == 3

    # Same seed, same structure (determinism on one machine).
    again = tmp_path / "again"
    run_generate(models, again, f"target={target}", "n=1", "density=2.5", "seed=7")
    np.testing.assert_allclose(ase.io.read(again / "structures.extxyz").positions,
                               frames[0].positions, atol=1e-6)

    # A different request into the same folder is refused, not mixed.
    proc = run_generate(models, out, f"target={target}", "n=1", "density=3.0", check=False)
    assert proc.returncode == 2 and "different request" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validator_other_than_the_guide_predicts_the_reported_spectra(tiny_models, tmp_path):
    """Guide with one surrogate, validate with another: the reported prediction is the
    validator's (here the judge checkpoint, so `mae` must equal `judge_mae`)."""
    target = REPO / "examples" / "target_rho2.5.csv"
    out = tmp_path / "validated"
    run_generate(tiny_models, out, f"target={target}", "n=1", "density=2.5",
                 f"models.validator={tiny_models / 'judge.pt'}")
    atoms = ase.io.read(out / "structures.extxyz")
    assert atoms.info["mae"] == pytest.approx(atoms.info["judge_mae"], rel=1e-9)
    plain = tmp_path / "plain"
    run_generate(tiny_models, plain, f"target={target}", "n=1", "density=2.5")
    guided_alike = ase.io.read(plain / "structures.extxyz")
    np.testing.assert_allclose(guided_alike.positions, atoms.positions, atol=1e-6)
    assert guided_alike.info["mae"] != pytest.approx(guided_alike.info["judge_mae"], rel=1e-6)


def test_shipped_surrogates_load_by_name():
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.forward.surrogate import (SHIPPED_SURROGATES, load_surrogate,
                                             surrogate_checkpoint_path)

    for name, file in SHIPPED_SURROGATES.items():
        assert surrogate_checkpoint_path(name).name == file and surrogate_checkpoint_path(name).exists()
    assert load_surrogate("fast").config["featurizer"]["type"] == "descriptor"
    with pytest.raises(XanesdiffInputError, match="shipped name: default, fast, judge"):
        load_surrogate("quick")


def test_guided_memory_estimate_follows_the_guide_and_the_priors_recomputation():
    """Histogram-only guides get the small working-set estimate; anything with learned
    (M3GNet, GNN) features, alone or next to histograms, the large one, unless those recompute
    their backward pass. The prior's share is what it keeps for its backward pass: far less in
    a cell where it recomputes its messages."""
    from types import SimpleNamespace

    from xanesdiff.diffusion.score_model import EquivariantScoreModel
    from xanesdiff.diffusion.sampling import cubic_cell_for_density
    from xanesdiff.guidance.pipeline import descriptor_only, guided_step_mb

    prior = EquivariantScoreModel(n_layers=1)
    prior.recompute_min_edges = 2 ** 62
    cell = cubic_cell_for_density(1000, 2.5)
    hist = {"type": "descriptor"}
    cases = {"descriptor": (hist, True), "m3gnet": ({"type": "m3gnet"}, False),
             "concat": ({"type": "concat", "parts": [{"type": "m3gnet"}, hist]}, False),
             "gnn": ({"type": "gnn_scratch"}, False)}
    estimates = {}
    for name, (featurizer, expected) in cases.items():
        guide = SimpleNamespace(config={"featurizer": featurizer})
        assert descriptor_only(guide) is expected, name
        estimates[name] = guided_step_mb(guide, prior, 1000, cell)
    assert estimates["descriptor"] < min(estimates["m3gnet"], estimates["concat"], estimates["gnn"])
    # M3GNet features recomputed span by span (large cells) keep far less than their graph
    recomputing = SimpleNamespace(config={"featurizer": {"type": "m3gnet"}},
                                  featurizer=SimpleNamespace(recomputes=lambda n, device: n > 500))
    assert guided_step_mb(recomputing, prior, 1000, cell) < estimates["m3gnet"] - 400
    assert guided_step_mb(recomputing, prior, 400, cell) == guided_step_mb(
        SimpleNamespace(config={"featurizer": {"type": "m3gnet"}}), prior, 400, cell)
    # ≈22 neighbours within 3.5 Å at 2.5 g/cm³: the prior keeps ≈0.4 MB per atom unless it recomputes
    fast = SimpleNamespace(config={"featurizer": hist})
    plain = guided_step_mb(fast, prior, 1000, cell)
    prior.recompute_min_edges = 0
    recomputed = guided_step_mb(fast, prior, 1000, cell)
    assert 250 < plain - recomputed < 500


def test_report_quotes_the_validators_held_out_error_when_it_is_measured(tiny_models, tmp_path):
    from xanesdiff.forward.heldout_error import fit_heldout_error, save_heldout_error

    validator = tmp_path / "validator.pt"
    shutil.copy(tiny_models / "guide.pt", validator)
    errors = {"a": np.full((2, 100), 0.004), "b": np.full((3, 100), -0.008)}
    save_heldout_error(validator, fit_heldout_error(errors, np.linspace(275, 313, 100)))
    target = REPO / "examples" / "target_rho2.5.csv"
    run_generate(tiny_models, tmp_path / "run", f"target={target}", "n=1", "density=2.5",
                 f"models.validator={validator}")
    summary = json.loads((tmp_path / "run" / "report.json").read_text())["summary"]
    assert summary["validator_heldout_mae"] == pytest.approx(0.006)
    assert (tmp_path / "run" / "spectra.png").stat().st_size > 10_000


def test_large_cell_advice_names_the_faster_settings_on_the_cpu_only(caplog):
    from types import SimpleNamespace

    import torch

    from xanesdiff.scripts.generate import _advise_fast_guide

    learned = SimpleNamespace(config={"featurizer": {"type": "m3gnet"}})
    histograms = SimpleNamespace(config={"featurizer": {"type": "descriptor"}})
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level("WARNING", logger="xanesdiff.generate"):
        _advise_fast_guide(10_000, learned, cpu)
        assert "models.surrogate=fast sampler=pc_quick" in caplog.text
        assert "preset=rapid" in caplog.text
        caplog.clear()
        for n_atoms, guide, device in ((216, learned, cpu), (10_000, histograms, cpu),
                                       (10_000, learned, gpu)):
            _advise_fast_guide(n_atoms, guide, device)
        assert caplog.text == ""


def test_generate_infers_density_and_steers_without_target(tiny_models, tmp_path):
    target = REPO / "examples" / "target_rho2.5.csv"
    out = tmp_path / "infer"
    run_generate(tiny_models, out, f"target={target}", "n=1")
    report = json.loads((out / "report.json").read_text())
    # the example target is a prediction for a frame of the 2.49 g/cm³ network
    assert report["density"]["method"].endswith("ReferenceDensity")
    assert abs(report["density"]["inferred_g_cm3"] - 2.49) < 0.15
    # the report lists the reference networks' matches; the interpolated curve is in its file
    assert {s["stage"] for s in report["density"]["scan"]} == {"references"}
    curve = json.loads((out / report["density"]["scan_file"]).read_text())
    assert {s["stage"] for s in curve["scan"]} == {"interpolated", "references"}
    assert curve["inferred_density_g_cm3"] == report["density"]["inferred_g_cm3"]
    assert (out / "density_scan.png").exists()

    # the other method into the same folder: overwrite drops the first request's inferred density
    run_generate(tiny_models, out, f"target={target}", "n=1", "density_search=scan",
                 "density_search.coarse_g_cm3=[2.0,3.0]", "density_search.refine_step_g_cm3=0.5",
                 "overwrite=true")
    report = json.loads((out / "report.json").read_text())
    assert {s["stage"] for s in report["density"]["scan"]} == {"coarse", "refined"}
    assert 2.0 <= report["density"]["inferred_g_cm3"] <= 3.0

    steer = tmp_path / "steer"
    run_generate(tiny_models, steer, "steer=pi_star_up", "density=2.0", "n=1")
    report = json.loads((steer / "report.json").read_text())
    assert report["target"] is None and report["steer"] == "pi_star_up"


@pytest.mark.parametrize("overrides,expected", [
    (["target=/nonexistent/spectrum.csv", "density=2.5"], "does not exist"),
    (["steer=no_such_steer", "density=2.5"], "no steer named 'no_such_steer'"),
    (["density=2.5"], "nothing to guide on"),
    (["target=examples/target_rho2.5.csv", "density=9.0"], "outside 0.5–4.0"),
    (["target=examples/target_rho2.5.csv", "n=0"], "n must be a positive"),
    (["target=examples/target_rho2.5.csv", "no_such_field=1"], "no_such_field"),
])
def test_generate_request_errors_are_one_clear_line(tiny_models, tmp_path, overrides, expected):
    out = tmp_path / "bad"
    proc = run_generate(tiny_models, out, *overrides, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "structures.extxyz").exists()


def test_wrong_kind_of_checkpoint_is_refused(tiny_models, tmp_path):
    proc = run_generate(tiny_models, tmp_path / "x", "target=examples/target_rho2.5.csv",
                        "density=2.5", f"models.prior={tiny_models / 'guide.pt'}", check=False)
    assert proc.returncode == 2 and "expected 'diffusion_prior'" in proc.stderr


def test_killed_generate_resumes_without_losing_finished_structures(tiny_models, tmp_path):
    import signal
    import time

    target = REPO / "examples" / "target_rho2.5.csv"
    out = tmp_path / "killed"
    env = {**os.environ, "XANESDIFF_THREADS": "1", "OMP_NUM_THREADS": "1"}
    args = [f"target={target}", "n=4", "density=2.5", "n_atoms=48", "sampler.n_steps=15"]
    cmd = [sys.executable, "-m", "xanesdiff.scripts.cli", "generate", f"out={out}",
           f"models.prior={tiny_models / 'prior.pt'}", f"models.surrogate={tiny_models / 'guide.pt'}",
           f"models.judge={tiny_models / 'judge.pt'}", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = out / "samples" / "sample_000.extxyz"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), "no structure finished before the deadline"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in (out / "samples").glob("sample_*.extxyz"))
    assert finished and not (out / "structures.extxyz").exists()
    kept = {name: (out / "samples" / name).read_bytes() for name in finished}
    for name in finished:  # every finished file is whole
        assert len(ase.io.read(out / "samples" / name)) == 48

    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, timeout=600)
    assert len(ase.io.read(out / "structures.extxyz", index=":")) == 4
    assert all((out / "samples" / n).read_bytes() == b for n, b in kept.items())
    assert not list(out.rglob(".*.tmp*"))


def test_generate_edits_a_given_structure(tiny_models, tmp_path):
    """`start=FILE`: each structure is the start re-noised and guided back (its cell, atoms and
    density kept); the report compares it with the start, relative steers refer to the start,
    and contradictory or bad requests are refused."""
    from ase.build import bulk

    start = bulk("C", "diamond", cubic=True).repeat(2)  # 64 atoms, 3.51 g/cm³
    path = tmp_path / "start.vasp"
    ase.io.write(path, start, format="vasp")
    out = tmp_path / "edit"
    run_generate(tiny_models, out, f"start={path}", "steer=pi_star_up", "n=2",
                 "start_noise_A=0.1")
    frames = ase.io.read(out / "structures.extxyz", index=":")
    assert len(frames) == 2
    assert all(len(a) == 64 and np.allclose(a.cell.array, start.cell.array) for a in frames)
    info = frames[0].info
    assert info["start_frame"] == 0 and info["start_noise_A"] == 0.1
    assert 0 < info["start_rms_displacement_A"] < 0.5
    assert info["pi_star_up_target"] == pytest.approx(1.2 * info["start_pi_star_up"], rel=1e-5)
    assert {"pi_star_up", "judge_pi_star_up", "start_judge_pi_star_up"} <= set(info)
    report = json.loads((out / "report.json").read_text())
    assert report["density"]["start_g_cm3"][0] == pytest.approx(3.51, abs=0.02)
    assert report["start"]["noise_A"] == 0.1 and report["start"]["source"] == str(path)
    assert report["structure"]["reference"]["pooled"]["sp3"] == pytest.approx(1.0)  # the start
    header = (out / "spectra.csv").read_text().splitlines()[0].split(",")
    assert header == ["energy_eV", "start_0", "structure_0", "structure_1"]

    # a region: atoms beyond 3 Å of the cell centre (minimum image) stay exactly put
    from ase.geometry import find_mic

    from xanesdiff.analysis.structure import displacements

    centre = start.cell.array.sum(0) / 2
    inside = find_mic(start.positions - centre, start.cell, pbc=True)[1] <= 3.0
    run_generate(tiny_models, tmp_path / "region", f"start={path}", "steer=pi_star_up", "n=1",
                 "start_noise_A=0.3", f"start_region.center_A=[{','.join(map(str, centre))}]",
                 "start_region.radius_A=3.0")
    local = ase.io.read(tmp_path / "region" / "structures.extxyz")
    moved = displacements(start, local)
    assert local.info["mobile_atoms"] == inside.sum() > 0
    assert moved[~inside].max() < 1e-4 and moved[inside].max() > 0.05

    # without a target or a steer: the prior's own variants of the start
    run_generate(tiny_models, tmp_path / "variants", f"start={path}", "n=1",
                 "validated_g_cm3=[1.5,3.0]")
    variant = ase.io.read(tmp_path / "variants" / "structures.extxyz")
    assert variant.info["guided_steps"] == 0 and len(variant) == 64
    # settings checked at 1.5–3.0 g/cm³ concern the start's own density (3.51), as the prior's do
    concern = json.loads((tmp_path / "variants" / "report.json").read_text())["settings_fidelity"]
    assert concern.startswith("these settings were validated at 1.5–3 g/cm³, not at 3.51")

    silicon = start.copy()
    silicon.numbers[:] = 14
    bad_path = tmp_path / "si.extxyz"
    ase.io.write(bad_path, [start, silicon])
    for overrides, expected in (
            ([f"start={path}", "density=2.0"], "fixes the density"),
            ([f"start={bad_path}"], f"{bad_path} (frame 1): element(s) Si not supported"),
            ([f"start={path}", "start_noise_A=5"], "start_noise_A: 5"),
            ([f"start={path}", "start_region.atoms=[64]"], "start_region: atoms: expected")):
        proc = run_generate(tiny_models, tmp_path / "bad", "steer=pi_star_up", *overrides,
                            check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU")
def test_generate_on_the_gpu_writes_the_structure_the_cpu_writes(tiny_models, tmp_path):
    """`device=cuda` runs prior, guide and validation on the GPU; a seed's structure is the one
    the CPU makes (random draws come from a CPU generator either way)."""
    target = REPO / "examples" / "target_rho2.5.csv"
    frames = {}
    for device in ("cpu", "cuda"):
        run_generate(tiny_models, tmp_path / device, f"target={target}", "density=2.5", "n=1",
                     f"device={device}")
        frames[device] = ase.io.read(tmp_path / device / "structures.extxyz")
    delta = frames["cpu"].positions - frames["cuda"].positions
    cell = frames["cpu"].cell.array
    delta -= np.round(delta @ np.linalg.inv(cell)) @ cell
    assert np.abs(delta).max() < 1e-3
    assert abs(frames["cpu"].info["mae"] - frames["cuda"].info["mae"]) < 1e-4


def test_a_cell_whose_validation_would_not_fit_is_refused_before_sampling(monkeypatch):
    """M3GNet's pass without gradient runs span by span, so it grows with the bonds (∝ atoms ×
    density): `generate` refuses, before sampling, a cell whose validation would exceed the
    device's memory, naming the key to change; histogram surrogates need no such room."""
    import torch

    import xanesdiff.runtime as runtime
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.validation import check_validation_fits, prediction_mb

    m3gnet, histograms = load_surrogate("default"), load_surrogate("fast")
    one = prediction_mb(m3gnet, 10_000, 80_000.0)
    assert 400 < one < 2000  # ≈1 GB at 10⁴ atoms (9.5 GB measured at 10⁵)
    assert prediction_mb(m3gnet, 20_000, 160_000.0) == pytest.approx(2 * one)  # same density
    assert prediction_mb(m3gnet, 10_000, 40_000.0) == pytest.approx(2 * one)
    assert prediction_mb(histograms, 10**6, 8e6) == 0

    monkeypatch.setattr(runtime, "device_memory_mb", lambda device=None: 24_000.0)
    cpu = torch.device("cpu")
    check_validation_fits(100_000, 2.5, {"models.validator": m3gnet}, cpu)
    check_validation_fits(10**6, 2.5, {"models.validator": histograms, "models.judge": None},
                          cpu)
    with pytest.raises(XanesdiffInputError, match=r"models\.judge=fast") as refused:
        check_validation_fits(10**6, 2.5, {"models.validator": histograms,
                                          "models.judge": m3gnet}, cpu)
    assert "1000000-atom" in str(refused.value)


def test_rapid_preset_sets_the_fast_models_sampler_and_window_and_yields_to_overrides():
    from hydra import compose, initialize_config_module

    from xanesdiff.guidance.request import compose_generate_config

    rapid = compose_generate_config(["preset=rapid"])
    assert (rapid.models.prior, rapid.models.surrogate) == ("painn", "fast")
    assert (rapid.sampler.n_steps, rapid.sampler.n_corrector,
            rapid.sampler.final_corrector_steps) == (50, 1, 2)
    assert (rapid.guided_score.refresh_every, rapid.guided_score.max_t) == ("step", 0.6)
    default = compose_generate_config([])
    assert (default.models.prior, default.sampler.n_steps, default.guided_score.max_t) == (
        "default", 100, None)
    mine = compose_generate_config(["preset=rapid", "models.prior=default", "sampler.n_steps=7"])
    assert (mine.models.prior, mine.sampler.n_steps, mine.sampler.n_corrector) == ("default", 7, 1)
    with initialize_config_module("xanesdiff.configs", version_base="1.3"):
        library = compose("library", overrides=["preset=rapid"])
    assert (library.models.prior, library.sampler.n_corrector,
            library.guided_score.max_t) == ("painn", 1, 0.6)


def test_settings_warn_outside_the_densities_they_were_validated_at(caplog):
    from xanesdiff.guidance.request import compose_generate_config, settings_concern

    rapid = compose_generate_config(["preset=rapid"])
    with caplog.at_level("WARNING", logger="xanesdiff.generate"):
        assert settings_concern(rapid, 2.5) is None and caplog.text == ""
        concern = settings_concern(rapid, 3.49)
    assert "validated at 1.5–3 g/cm³, not at 3.49" in concern and "five-fold" in concern
    assert concern in caplog.text
    assert settings_concern(compose_generate_config([]), 3.49) is None  # defaults: no range


def test_rapid_preset_guides_only_below_its_max_t(tiny_models, tmp_path):
    """End to end with the preset's sampler and window (tiny models given on the command line):
    guidance is recomputed once per step, and only at t ≤ 0.6."""
    from xanesdiff.diffusion.samplers import PredictorCorrector
    from xanesdiff.diffusion.schedule import VESchedule

    target = REPO / "examples" / "target_rho2.5.csv"
    run_generate(tiny_models, tmp_path / "run", "preset=rapid", f"target={target}", "n=1",
                 "density=2.5", "sampler.n_steps=6", "sampler.n_corrector=1",
                 "sampler.final_corrector_steps=2")
    frame = ase.io.read(tmp_path / "run" / "structures.extxyz")
    grid = PredictorCorrector(VESchedule(0.8), n_steps=6, t_end=0.04).time_grid()
    calls = [t for t_now, t_next in zip(grid[:-1], grid[1:]) for t in (t_now, t_next)]
    calls += [grid[-1]] * 3  # two final corrector steps and the denoising step
    guided_calls = sum(t <= 0.6 for t in calls)
    assert 0 < guided_calls < len(calls)
    assert frame.info["guided_steps"] == (guided_calls + 1) // 2
