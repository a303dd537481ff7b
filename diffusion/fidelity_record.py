"""What the prior's benchmark measured at each training density, kept beside the checkpoint.

`python -m xanesdiff.scripts.benchmark_prior --record` (or `--record-from RESULT.json`) writes
`<checkpoint>.fidelity.json`: for every benchmarked density, the structure targets the sampled
cells missed (value, limit, and the sample's and reference network's sp3/sp2 where those
missed), stamped with the checkpoint's SHA-256. `load_prior` attaches it as `prior.fidelity`;
`sample` and `generate` warn when asked for a density near one where the prior missed, and put
the same sentence in their report, so a known weak range is said where the structures are made
and not only in the README.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xanesdiff.datasets.errors import XanesdiffInputError

log = logging.getLogger("xanesdiff.diffusion")

LIMIT_KEY = {"cn1": "cn1", "cn5plus": "cn5plus", "sp3_err": "sp3_err", "sp2_err": "sp2_err",
             "rdf_peak_err": "rdf_peak_err", "dmin": "dmin_min"}
"""A benchmark row's field → the key of its limit in the benchmark's `targets`."""

AT_LEAST = {"dmin"}
"""Targets that are lower bounds (Å); every other target is an upper bound."""


@dataclass
class FidelityRecord:
    """Per density (g/cm³, as a string key), the targets missed: {name: {"value", "limit", …}};
    an empty dict means every target was met there."""

    per_density: dict[str, dict[str, dict]]
    sampler: str = ""
    n_samples: int = 0
    checkpoint_sha256: str = ""
    command: str = ""
    targets: dict = field(default_factory=dict)
    advice: str = ""  # appended to every concern, e.g. a sampler that does better there

    def concerns(self, density_g_cm3: float, within_g_cm3: float = 0.25) -> str | None:
        """A sentence naming what this prior missed at the benchmarked density nearest
        `density_g_cm3`, if that density lies within `within_g_cm3` and missed anything."""
        if not self.per_density:
            return None
        nearest = min(self.per_density, key=lambda key: abs(float(key) - density_g_cm3))
        misses = self.per_density[nearest]
        if abs(float(nearest) - density_g_cm3) > within_g_cm3 or not misses:
            return None
        parts = []
        for name, miss in misses.items():
            bound = "≥" if name in AT_LEAST else "≤"
            detail = (f" (sample {miss['sample']:.3f}, network {miss['reference']:.3f})"
                      if "sample" in miss else "")
            parts.append(f"{name} {miss['value']:.3f} (target {bound} {miss['limit']}){detail}")
        return (f"at {nearest} g/cm³ this prior's benchmark ({self.n_samples} samples, sampler "
                f"{self.sampler or 'default'}) missed: " + "; ".join(parts)
                + (f". {self.advice}" if self.advice else ""))


def prior_concerns(prior, density_g_cm3: float) -> str | None:
    """What `prior`'s recorded benchmark missed near `density_g_cm3`, also logged as a warning;
    None where it met every target there or nothing is recorded."""
    record = getattr(prior, "fidelity", None)
    concern = record.concerns(density_g_cm3) if record is not None else None
    if concern:
        log.warning(concern)
    return concern


def fidelity_from_benchmark(result: dict, advice: str = "") -> FidelityRecord:
    """The record of a `benchmark_prior` result (its `per_density` rows and `targets`), its
    warnings ending with `advice`."""
    targets = result["targets"]
    per_density: dict[str, dict[str, dict]] = {}
    for density, row in result["per_density"].items():
        misses = {}
        for name, limit_key in LIMIT_KEY.items():
            value, limit = float(row[name]), float(targets[limit_key])
            if (value < limit) if name in AT_LEAST else (value > limit):
                misses[name] = {"value": value, "limit": limit}
                kind = name.removesuffix("_err")
                if kind in ("sp3", "sp2"):
                    misses[name].update(sample=float(row["sample"][kind]),
                                        reference=float(row["reference"][kind]))
        per_density[density] = misses
    sampler = result.get("sampler") or {}
    name = ""
    if isinstance(sampler, dict) and sampler.get("_target_"):
        name = sampler["_target_"].rsplit(".", 1)[-1] + (
            f", {sampler['n_steps']} steps" if "n_steps" in sampler else "")
        if sampler.get("density_cooling"):
            name += f", cooled from {sampler['density_cooling']['from_g_cm3']} g/cm³"
        if dense := sampler.get("dense_steps"):
            name += f", {dense['factor']}× the steps from {dense['from_g_cm3']} g/cm³"
    if (autoguidance := result.get("autoguidance")) and autoguidance.get("from_g_cm3"):
        name += f", autoguided from {autoguidance['from_g_cm3']} g/cm³"
    n_samples = max((int(row.get("n_samples", 0)) for row in result["per_density"].values()),
                    default=0)
    return FidelityRecord(per_density=per_density, sampler=name, n_samples=n_samples,
                          command=result.get("command", ""), targets=dict(targets),
                          advice=advice)


def fidelity_record_path(checkpoint: str | os.PathLike) -> Path:
    """The file beside `checkpoint` that holds its benchmark record."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.fidelity.json")


def save_fidelity_record(checkpoint: str | os.PathLike, record: FidelityRecord) -> Path:
    """Write `record` beside `checkpoint` (atomically), stamped with the checkpoint's SHA-256."""
    from xanesdiff.datasets.spectra_io import atomic_write_text, file_sha256

    record.checkpoint_sha256 = file_sha256(checkpoint)
    path = fidelity_record_path(checkpoint)
    atomic_write_text(path, json.dumps(asdict(record), indent=1) + "\n")
    return path


def load_fidelity_record(checkpoint: str | os.PathLike) -> FidelityRecord | None:
    """The benchmark record of `checkpoint`; None when there is none, or (with a warning) when
    it was measured for other weights than the file now holds."""
    from xanesdiff.datasets.spectra_io import file_sha256

    path = fidelity_record_path(checkpoint)
    if not path.exists():
        return None
    try:
        record = FidelityRecord(**json.loads(path.read_text()))
        for density, misses in record.per_density.items():  # raises unless keys are densities
            float(density)                                   # and every miss has its numbers
            for miss in misses.values():
                float(miss["value"]), float(miss["limit"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise XanesdiffInputError(
            f"not a prior benchmark record ({type(exc).__name__}: {exc}); rewrite it with "
            "python -m xanesdiff.scripts.benchmark_prior --record", str(path)) from None
    if record.checkpoint_sha256 != file_sha256(checkpoint):
        log.warning("%s was measured for other weights than %s holds now; ignored (rerun "
                    "benchmark_prior --record)", path.name, Path(checkpoint).name)
        return None
    return record
