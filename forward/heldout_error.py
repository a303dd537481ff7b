"""How far a surrogate's mean spectrum is from the truth on a network it has never seen.

The ensemble's spread says how much its members disagree, not how wrong they are together: on a
held-out a-C network the error of the mean spectrum is 3–9× the spread (benchmarks/forward.md),
and it is a network-level error (the same in every frame), so no rescaling of the spread fixes
it. `HeldOutError` is measured instead: the surrogate's recipe retrained without each network in
turn (`scripts/calibrate_forward.py`), the RMS error of the held-out mean spectra per energy point,
each network weighted equally. A prediction's band is then √(σ_ensemble² + rms²): disagreement
plus the error a new network brings.

It is stored next to the checkpoint it describes (`forward_default.pt` →
`forward_default.heldout.json`) with that file's SHA-256, and is read only for that file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xanesdiff.datasets.errors import XanesdiffInputError

log = logging.getLogger("xanesdiff.forward")


@dataclass
class HeldOutError:
    """Per-energy held-out error of a surrogate's mean spectrum (spectrum units)."""

    energies_eV: np.ndarray
    rms: np.ndarray
    checkpoint_sha256: str = ""
    network_mae: dict = field(default_factory=dict)
    coverage: float | None = None
    ensemble_coverage: float | None = None
    command: str = ""

    def band(self, ensemble_std: np.ndarray) -> np.ndarray:
        """√(σ_ensemble² + rms²), per energy point."""
        return np.sqrt(np.asarray(ensemble_std) ** 2 + self.rms ** 2)


def fit_heldout_error(errors_by_network: dict[str, np.ndarray], energies_eV,
                      spread_by_network: dict[str, np.ndarray] | None = None) -> HeldOutError:
    """From the held-out errors (predicted − true mean spectrum, (frames, M)) of each network
    and, optionally, the ensemble's σ of those predictions (same shapes): the per-energy RMS
    with every network weighted equally (a network with more snapshots does not count more),
    the mean-spectrum MAE per network, and how often the truth lies inside the bands, measured
    honestly: `coverage`, the fraction of each network's errors within ±√(σ² + rms²) with the
    rms computed without that network; `ensemble_coverage`, within ±σ alone."""
    if len(errors_by_network) < 2:
        raise ValueError("need held-out errors of at least two networks")
    errors = {name: np.asarray(e, float) for name, e in errors_by_network.items()}
    spreads = {name: (np.zeros_like(e) if spread_by_network is None
                      else np.asarray(spread_by_network[name], float))
               for name, e in errors.items()}
    mse = {name: np.mean(e ** 2, axis=0) for name, e in errors.items()}
    rms = np.sqrt(np.mean(list(mse.values()), axis=0))
    inside_band, inside_spread = [], []
    for name, e in errors.items():
        others = np.mean([m for n, m in mse.items() if n != name], axis=0)
        inside_band.append(np.mean(np.abs(e) <= np.sqrt(spreads[name] ** 2 + others)))
        inside_spread.append(np.mean(np.abs(e) <= spreads[name]))
    return HeldOutError(
        energies_eV=np.asarray(energies_eV, float), rms=rms,
        network_mae={name: float(np.abs(e).mean()) for name, e in errors.items()},
        coverage=float(np.mean(inside_band)),
        ensemble_coverage=None if spread_by_network is None else float(np.mean(inside_spread)))


def heldout_error_path(checkpoint: str | os.PathLike) -> Path:
    """The file beside `checkpoint` that holds its held-out error."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.heldout.json")


def save_heldout_error(checkpoint: str | os.PathLike, error: HeldOutError) -> Path:
    """Write `error` beside `checkpoint` (atomically), stamped with the checkpoint's SHA-256."""
    from xanesdiff.datasets.spectra_io import atomic_write_text, file_sha256

    error.checkpoint_sha256 = file_sha256(checkpoint)
    payload = {key: (value.tolist() if isinstance(value, np.ndarray) else value)
               for key, value in asdict(error).items()}
    path = heldout_error_path(checkpoint)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def load_heldout_error(checkpoint: str | os.PathLike, n_energies: int) -> HeldOutError | None:
    """The held-out error measured for `checkpoint`; None when there is none, or (with a
    warning) when it was measured for other weights than the file now holds."""
    from xanesdiff.datasets.spectra_io import file_sha256

    path = heldout_error_path(checkpoint)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        error = HeldOutError(**{**payload, "energies_eV": np.asarray(payload["energies_eV"], float),
                                "rms": np.asarray(payload["rms"], float)})
    except (ValueError, TypeError, KeyError) as exc:
        raise XanesdiffInputError(f"not a held-out error file ({type(exc).__name__}: {exc}); "
                                  "rewrite it with scripts/calibrate_forward.py",
                                  str(path)) from None
    if error.rms.shape != (n_energies,) or error.energies_eV.shape != (n_energies,):
        raise XanesdiffInputError(f"rms and energies_eV must hold {n_energies} values (the "
                                  f"checkpoint's grid), got {error.rms.shape[0]} and "
                                  f"{error.energies_eV.shape[0]}", str(path))
    if error.checkpoint_sha256 != file_sha256(checkpoint):
        log.warning("%s was measured for other weights than %s holds now; ignored (rerun "
                    "scripts/calibrate_forward.py)", path.name, Path(checkpoint).name)
        return None
    return error
