"""`xanesdiff predict` on POSCAR / extxyz / CIF, and a tiny `train-forward` run with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xanesdiff.scripts.predict import split_arguments

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, XANESDIFF_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "xanesdiff.scripts.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bare_paths_become_one_override(tmp_path):
    (tmp_path / "a b.vasp").write_text("x")
    args = split_arguments([str(tmp_path / "a b.vasp"), "out=x", "--cfg", "job", "c.cif"])
    assert args[0] == f"structures=['{tmp_path / 'a b.vasp'}','c.cif']"
    assert args[1:] == ["out=x", "--cfg", "job"]


def test_predict_poscar_extxyz_cif(a_c_dataset, tmp_path):
    import ase.io

    from xanesdiff.datasets.spectra_io import read_spectra_csv

    frames = a_c_dataset.frames
    ase.io.write(tmp_path / "POSCAR", frames[0].atoms, format="vasp")
    ase.io.write(tmp_path / "traj.extxyz", [f.atoms for f in frames[1:4]])
    ase.io.write(tmp_path / "cell.cif", frames[4].atoms)
    out = tmp_path / "pred"
    result = _cli("predict", str(tmp_path / "POSCAR"), str(tmp_path / "traj.extxyz"),
                  str(tmp_path / "cell.cif"), f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    energies, summary = read_spectra_csv(out / "summary.csv")
    assert list(summary) == ["POSCAR_0000", "traj_0000", "traj_0001", "traj_0002", "cell_0000"]
    assert len(energies) == 100 and np.all(np.diff(energies) > 0)
    for name, frame in zip(summary, frames[:5]):
        # every prediction is close to that frame's reference mean spectrum (trained networks)
        assert np.abs(summary[name] - frame.mean_spectrum).mean() < 0.012, name
        _, mean_cols = read_spectra_csv(out / f"{name}_mean.csv")
        assert {"mean", "std", "member_0", "member_3"} <= set(mean_cols)
        assert (mean_cols["std"] >= 0).all()
        # the shipped checkpoint's held-out error is measured: the band adds it to the spread
        np.testing.assert_allclose(mean_cols["band"] ** 2,
                                   mean_cols["std"] ** 2 + mean_cols["heldout_rms"] ** 2,
                                   rtol=1e-5, atol=1e-12)
        assert np.median(mean_cols["heldout_rms"]) > 2 * np.median(mean_cols["std"])
        _, site_cols = read_spectra_csv(out / f"{name}_sites.csv")
        assert len(site_cols) == 216 and "site_215" in site_cols
        np.testing.assert_allclose(np.mean(list(site_cols.values()), axis=0), mean_cols["mean"],
                                   rtol=1e-4, atol=1e-6)
    for png in ("POSCAR.png", "traj.png", "cell.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_reports_bad_input(tmp_path):
    (tmp_path / "bad.xyz").write_text("3\n\nC 0 0 0\nC 0 0 1\n")
    result = _cli("predict", str(tmp_path / "bad.xyz"), f"out={tmp_path / 'o'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.xyz" in result.stderr and "Traceback" not in result.stderr


def test_train_forward_tiny_and_resume(tmp_path):
    import torch

    from xanesdiff.forward.surrogate import load_surrogate

    common = ["forward=descriptor", f"out_dir={tmp_path / 'run'}", "head.n_members=2",
              "head.hidden=[16]", "train.min_epochs=1", "progress=false", "threads=1",
              "data.exclude_densities=[2.0,3.0]"]
    first = _cli("train-forward", *common, "train.max_epochs=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary1 = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary1["epochs"] == 2 and sorted(summary1["excluded_networks"]) == ["rho2.00",
                                                                               "rho2.99"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    lightning_ckpt = torch.load(last, weights_only=False)
    assert lightning_ckpt["surrogate"]["kind"] == "forward_surrogate"
    assert lightning_ckpt["surrogate"]["grid"]["n_points"] == 100
    second = _cli("train-forward", *common, "train.max_epochs=3", "ckpt_path=auto", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    summary2 = json.loads(second.stdout.strip().splitlines()[-1])
    steps_per_epoch = summary1["global_step"] // 2
    assert summary2["global_step"] == summary1["global_step"] + steps_per_epoch
    model = load_surrogate(tmp_path / "run" / "surrogate.pt")
    assert model.n_members == 2 and model.config["featurizer"]["type"] == "descriptor"
    assert model.config["excluded_networks"] == summary2["excluded_networks"]
