"""Writing generation results: structures with metrics in `info`, report.json, and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from xanesdiff.datasets.spectra_io import atomic_write_text


def to_jsonable(value):
    """numpy/torch scalars and arrays → plain Python for JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, payload: dict) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(payload), indent=2) + "\n")


def write_extxyz(path: str | os.PathLike, frames: list) -> None:
    """Write frames (metrics already in `atoms.info`) atomically."""
    import ase.io

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    ase.io.write(tmp, frames, format="extxyz")
    os.replace(tmp, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def plot_spectra(path: str | os.PathLike, energy_eV: np.ndarray, target: np.ndarray | None,
                 predicted: list[np.ndarray], predicted_std: list[np.ndarray],
                 labels: list[str], title: str = "", target_band: np.ndarray | None = None
                 ) -> None:
    """Target vs predicted mean spectra, each prediction with its ±1σ ensemble band; with
    `target_band` (the validator's held-out RMS per energy), a grey band of ± that around the
    target: how far the prediction of a structure that truly matched could still lie."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if target is not None:
        ax.plot(energy_eV, target, color="black", lw=2.2, label="target")
        if target_band is not None:
            ax.fill_between(energy_eV, target - target_band, target + target_band, color="0.6",
                            alpha=0.35, lw=0, label="± validator's held-out error")
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(predicted), 1)))
    for mean, std, label, color in zip(predicted, predicted_std, labels, colors):
        ax.plot(energy_eV, mean, color=color, lw=1.2, label=label)
        ax.fill_between(energy_eV, mean - std, mean + std, color=color, alpha=0.25, lw=0)
    ax.set_xlabel("energy (eV, model grid)")
    ax.set_ylabel("intensity (model units)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_density_scan(path: str | os.PathLike, scan: list[dict], chosen: float) -> None:
    """Spectral mismatch vs density of the density search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    styles = {"coarse": dict(marker="o"), "refined": dict(marker="s"),
              "interpolated": dict(lw=1.2), "references": dict(marker="o", ls="none")}
    for stage in dict.fromkeys(s["stage"] for s in scan):
        pts = sorted((s["density_g_cm3"], s["mae"]) for s in scan if s["stage"] == stage)
        ax.plot(*zip(*pts), label=stage, **styles.get(stage, {}))
    ax.axvline(chosen, color="k", ls="--", lw=1, label=f"chosen {chosen:.2f}")
    ax.set_xlabel("density (g/cm³)")
    ax.set_ylabel("spectrum MAE to target")
    ax.legend(fontsize=8)
    save_figure(fig, path)
