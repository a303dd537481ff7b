"""Validation thresholds: which metrics a library structure must satisfy to be accepted.

    filters:
      max: {cn1: 0.15, mae: 0.02}           # metric ≤ value
      min: {min_distance_A: 1.0}            # metric ≥ value

A null value switches a bound off. A metric an item does not have (e.g. `mae` without a target
spectrum, energies without relaxation) is not checked for it. A NaN metric fails its bound.
"""

from __future__ import annotations

import math

from xanesdiff.datasets.errors import XanesdiffInputError

METRICS = {
    "mae": "spectral MAE of the surrogate's prediction vs the target",
    "spearman": "Spearman rank correlation, prediction vs target",
    "cosine": "cosine similarity, prediction vs target",
    "judge_mae": "spectral MAE by the independent judge surrogate",
    "judge_spearman": "Spearman correlation by the judge",
    "judge_cosine": "cosine similarity by the judge",
    "relaxed_mae": "spectral MAE after relaxation",
    "cn0": "fraction of atoms without neighbours within 1.85 Å",
    "cn1": "fraction of one-fold coordinated atoms",
    "sp": "fraction of two-fold (sp) atoms",
    "sp2": "fraction of three-fold (sp2) atoms",
    "sp3": "fraction of four-fold (sp3) atoms",
    "cn5plus": "fraction of over-coordinated (≥5) atoms",
    "mean_cn": "mean coordination number",
    "min_distance_A": "smallest interatomic distance (Å)",
    "density_g_cm3": "mass density of the cell (g/cm³)",
    "energy_per_atom_before_eV": "M3GNet energy per atom before relaxation (eV)",
    "energy_per_atom_after_eV": "M3GNet energy per atom after relaxation (eV)",
    "max_guidance_to_prior_rms": "largest guidance/prior score RMS ratio during sampling",
}


def check_filter_config(filters: dict) -> dict[str, dict[str, float]]:
    """Normalise `{max: {...}, min: {...}}`, refusing unknown metrics and non-numbers."""
    filters = dict(filters or {})
    unknown = set(filters) - {"max", "min"}
    if unknown:
        raise XanesdiffInputError(f"unknown field(s) {sorted(unknown)}; use filters.max.METRIC "
                                  "and filters.min.METRIC", "filters")
    out: dict[str, dict[str, float]] = {"max": {}, "min": {}}
    for side in ("max", "min"):
        for metric, bound in dict(filters.get(side) or {}).items():
            if metric not in METRICS:
                raise XanesdiffInputError(f"unknown metric {metric!r}; known: {sorted(METRICS)}",
                                          f"filters.{side}")
            if bound is None:
                continue
            try:
                out[side][metric] = float(bound)
            except (TypeError, ValueError):
                raise XanesdiffInputError(f"bound {bound!r} is not a number",
                                          f"filters.{side}.{metric}") from None
    return out


def threshold_failures(metrics: dict, filters: dict[str, dict[str, float]]) -> list[str]:
    """Human-readable reasons, one per violated bound (empty list: all satisfied)."""
    reasons = []
    for metric, bound in filters.get("max", {}).items():
        value = metrics.get(metric)
        if value is not None and (math.isnan(value) or value > bound):
            reasons.append(f"{metric} {value:.4g} > max {bound:g}")
    for metric, bound in filters.get("min", {}).items():
        value = metrics.get(metric)
        if value is not None and (math.isnan(value) or value < bound):
            reasons.append(f"{metric} {value:.4g} < min {bound:g}")
    return reasons
