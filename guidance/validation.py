"""Validation of generated structures: predicted spectrum vs target, and optional relaxation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from xanesdiff.forward.surrogate import featurizer_parts, predict_sites


def spectral_match(predicted: np.ndarray, target: np.ndarray) -> dict:
    """MAE, Spearman rank correlation and cosine similarity of two spectra on one grid."""
    predicted, target = np.asarray(predicted, float), np.asarray(target, float)
    cosine = float(predicted @ target / (np.linalg.norm(predicted) * np.linalg.norm(target) + 1e-12))
    return {"mae": float(np.abs(predicted - target).mean()),
            "spearman": float(spearmanr(predicted, target).statistic),
            "cosine": cosine}


def prediction_mb(surrogate, n_atoms: int, volume_A3: float) -> float:
    """Peak memory (MB) of predicting one cell's spectra: what its featurisers' passes without
    gradient need (`inference_mb`; histograms, small networks and surrogates of other kinds
    count as nothing here)."""
    return sum(part.inference_mb(n_atoms, volume_A3) for part in featurizer_parts(surrogate)
               if hasattr(part, "inference_mb"))


VALIDATION_MEMORY_FRACTION = 0.8
"""Share of the device's memory one structure's validation (a pass without gradient) may take."""


def check_validation_fits(n_atoms: int, density_g_cm3: float, surrogates: dict, device) -> None:
    """Refuse, before hours of sampling, cells whose validation would not fit in memory (an
    M3GNet pass over 10⁶ a-C atoms at 2.5 g/cm³ needs ≈80 GB). `surrogates`: {config key:
    surrogate or None}; the error names the key to change."""
    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.diffusion.sampling import cubic_cell_for_density
    from xanesdiff.runtime import device_memory_mb

    memory_mb = device_memory_mb(device)
    if memory_mb is None:
        return
    volume_A3 = abs(float(np.linalg.det(np.asarray(cubic_cell_for_density(n_atoms,
                                                                          density_g_cm3)))))
    for key, surrogate in surrogates.items():
        if surrogate is None:  # no judge
            continue
        need_mb = prediction_mb(surrogate, n_atoms, volume_A3)
        if need_mb > VALIDATION_MEMORY_FRACTION * memory_mb:
            raise XanesdiffInputError(
                f"validating a {n_atoms}-atom cell at {density_g_cm3:.2f} g/cm³ with {key}'s "
                f"M3GNet features needs ≈{need_mb / 1024:.0f} GB, more than "
                f"{VALIDATION_MEMORY_FRACTION:.0%} of this device's {memory_mb / 1024:.0f} GB: "
                f"name a histogram surrogate ({key}=fast) or generate fewer atoms", key)


def predict_members(surrogate, atoms) -> np.ndarray:
    """Ensemble members' mean spectra (K, M) of an ASE structure."""
    return predict_sites(surrogate, atoms).mean(1)


OUTLIER_SITE_FACTOR = 10.0
"""A site whose predicted peak exceeds this × the structure's median site peak is an outlier: an
environment far outside the training data (e.g. a pair closer than 1 Å), whose prediction can
dominate the mean spectrum of a large cell."""


def outlier_sites(site_spectra: np.ndarray, absorber_indices: np.ndarray) -> list[int]:
    """Atom indices of the outlier sites of one structure's (N_abs, M) site spectra."""
    peaks = site_spectra.max(1)
    threshold = OUTLIER_SITE_FACTOR * max(float(np.median(peaks)), 1e-12)
    return [int(i) for i in absorber_indices[peaks > threshold]]


def validate_spectrum(atoms, target: np.ndarray | None, surrogate, prefix: str = "") -> dict:
    """Prediction (ensemble mean and σ), the atoms whose site predictions are outliers (see
    `OUTLIER_SITE_FACTOR`) and, given a target, the match. Keys get `prefix`."""
    sites = predict_sites(surrogate, atoms)
    members = sites.mean(1)
    absorbers = (np.flatnonzero(surrogate.absorber_mask(torch.tensor(atoms.numbers)).numpy())
                 if hasattr(surrogate, "absorber_mask") else np.arange(sites.shape[1]))
    outliers = outlier_sites(sites.mean(0), absorbers)
    result = {f"{prefix}predicted": members.mean(0), f"{prefix}predicted_std": members.std(0),
              f"{prefix}outlier_sites": len(outliers)}
    if outliers:  # (an empty string would not survive an extxyz comment line)
        result[f"{prefix}outlier_atoms"] = ",".join(map(str, outliers))
    if target is not None:
        result.update({f"{prefix}{k}": v for k, v in
                       spectral_match(members.mean(0), target).items()})
    return result


def load_potential(model_dir: str | None = None):
    """The M3GNet universal potential (matgl, offline, eval mode) for short relaxations."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import matgl

    from xanesdiff.datasets.assets import resolve_asset

    potential = matgl.load_model(str(resolve_asset("models/M3GNet-MP-2021.2.8-PES", model_dir)))
    potential.eval()
    for p in potential.parameters():
        p.requires_grad_(False)
    return potential


def relax(atoms, potential, fmax_eV_A: float = 0.2, steps: int = 50) -> tuple[object, dict]:
    """Short fixed-cell FIRE relaxation with the M3GNet potential. Returns (relaxed atoms,
    {energy_per_atom_before_eV, energy_per_atom_after_eV, relax_steps})."""
    from ase.optimize import FIRE
    from matgl.ext.ase import PESCalculator

    relaxed = atoms.copy()
    relaxed.calc = PESCalculator(potential)
    before = relaxed.get_potential_energy() / len(relaxed)
    optimizer = FIRE(relaxed, logfile=None)
    optimizer.run(fmax=fmax_eV_A, steps=steps)
    after = relaxed.get_potential_energy() / len(relaxed)
    relaxed.calc = None
    return relaxed, {"energy_per_atom_before_eV": float(before),
                     "energy_per_atom_after_eV": float(after),
                     "relax_steps": int(optimizer.nsteps)}
