"""Plots of structure reports (matplotlib, Agg backend): RDF, coordination histogram, bond angles,
each sample set against its reference when the report has one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _curve_panel(ax, curves: dict, ref: dict | None, x_key: str, y_key: str, xlabel: str,
                 ylabel: str, title: str) -> None:
    """One panel: the samples' curve, and the reference's dashed when there is one."""
    ax.plot(curves[x_key], curves[y_key], label="samples", color="C0")
    if ref:
        ax.plot(ref[x_key], ref[y_key], label="reference", color="k", ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()


def plot_structure_report(report: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a three-panel PNG (RDF, coordination histogram, bond-angle distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    curves = report["curves"]
    ref = report.get("reference", {}).get("curves")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    _curve_panel(axes[0], curves, ref, "r_A", "rdf", "r (Å)", "g(r)", "radial distribution")
    ax = axes[1]
    cn = np.asarray(curves["cn_histogram"], dtype=float)
    width = 0.4 if ref else 0.8
    ax.bar(np.arange(len(cn)) - (width / 2 if ref else 0), cn / max(cn.sum(), 1), width,
           label="samples", color="C0")
    if ref:
        cr = np.asarray(ref["cn_histogram"], dtype=float)
        ax.bar(np.arange(len(cr)) + width / 2, cr / max(cr.sum(), 1), width, label="reference",
               color="0.4")
    ax.set_xlabel(f"coordination number (cutoff {report.get('cutoff_A', 1.85)} Å)")
    ax.set_ylabel("fraction of atoms")
    ax.set_title("coordination")
    ax.legend()
    _curve_panel(axes[2], curves, ref, "angle_deg", "angle_density", "bond angle (°)",
                 "probability density (1/°)", "bond angles")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
