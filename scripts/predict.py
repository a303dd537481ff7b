"""`xanesdiff predict STRUCTURE... [key=value ...]`: per-site and mean XANES with the surrogate.

    xanesdiff predict cell.vasp traj.extxyz model.cif            # -> runs/predict/
    xanesdiff predict traj.extxyz out=runs/pred checkpoint=checkpoints/forward_judge.pt

Every frame of every file (any ASE-readable format) gets
  <file>_<frame>_mean.csv   energy_eV, mean (ensemble mean), std (ensemble σ), [heldout_rms,
                            band,] member_k ...
  <file>_<frame>_sites.csv  energy_eV, one column per absorbing atom (site_<atom index>)
and each file one <file>.png (mean spectra with their ±1σ band); summary.csv holds the mean
spectrum of every frame. Where the checkpoint's held-out error has been measured
(`<checkpoint>.heldout.json`, scripts/calibrate_forward.py), `band` = √(std² + heldout_rms²) is
the uncertainty to quote for a structure unlike the training networks, and the plot shows it; the
ensemble σ alone is 3–9× smaller than the error on a new network (xanesdiff.forward.heldout_error).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig

from xanesdiff.scripts._hydra import hydra_app


def _quote(path: str) -> str:
    """A hydra-grammar string literal for a path."""
    if "'" not in path:
        return "'" + path.replace("\\", "\\\\") + "'"
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                           "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
                           "--info", "-i"}


def split_arguments(argv: list[str]) -> list[str]:
    """Turn bare structure paths into one ``structures=[...]`` override; keep everything else
    (``key=value`` overrides and hydra flags with their values)."""
    paths, rest = [], []
    expect_value = False
    for arg in argv:
        if expect_value and not arg.startswith("-") and "=" not in arg:
            rest.append(arg)
            expect_value = False
        elif arg.startswith("-") or ("=" in arg and not Path(arg).exists()):
            rest.append(arg)
            expect_value = arg in _HYDRA_FLAGS_WITH_VALUE
        else:
            paths.append(arg)
            expect_value = False
    if paths:
        rest.insert(0, "structures=[" + ",".join(_quote(p) for p in paths) + "]")
    return rest


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "structure"


def predict_file(surrogate, path: Path, out: Path, per_site: bool, plot: bool, progress) -> list:
    """Predict every frame of `path`; returns [(column name, mean spectrum)]. With the
    checkpoint's held-out error measured (`surrogate.heldout_error`), adds the held-out band."""
    import numpy as np

    from xanesdiff.datasets.spectra_io import write_spectra_csv
    from xanesdiff.datasets.structures import read_structures
    from xanesdiff.forward.surrogate import predict_sites

    frames = read_structures(path)
    energies, heldout = surrogate.grid.energies_eV, surrogate.heldout_error
    stem = _safe_stem(path)
    rows, bands = [], []
    for k, atoms in enumerate(frames):
        members = predict_sites(surrogate, atoms)          # (K, N_abs, M)
        member_means = members.mean(1)                     # (K, M)
        mean, std = member_means.mean(0), member_means.std(0)
        name = f"{stem}_{k:04d}"
        columns = {"mean": mean, "std": std}
        if heldout is not None:
            columns.update({"heldout_rms": heldout.rms, "band": heldout.band(std)})
        columns.update({f"member_{i}": m for i, m in enumerate(member_means)})
        write_spectra_csv(out / f"{name}_mean.csv", energies, columns)
        if per_site:
            absorbers = np.flatnonzero(atoms.numbers == surrogate.absorber_number)
            site_mean = members.mean(0)
            write_spectra_csv(out / f"{name}_sites.csv", energies,
                              {f"site_{a}": s for a, s in zip(absorbers, site_mean)})
        rows.append((name, mean))
        bands.append((name, mean, columns.get("band", std)))
        progress.update(1)
    if plot:
        what = "ensemble ⊕ held-out error" if heldout is not None else "ensemble only"
        plot_band(out / f"{stem}.png", energies, bands, f"{path.name}: predicted mean XANES "
                  f"({surrogate.absorber} K-edge), ±1σ ({what})")
    return rows


def plot_band(path: Path, energies, bands: list, title: str, max_curves: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, mean, std in bands[:max_curves]:
        line, = ax.plot(energies, mean, lw=1.2, label=name)
        ax.fill_between(energies, mean - std, mean + std, color=line.get_color(), alpha=0.25)
    if len(bands) > max_curves:
        ax.set_title(f"{title}\n(first {max_curves} of {len(bands)} frames)", fontsize=9)
    else:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("energy (eV, approximate grid)")
    ax.set_ylabel("intensity (dataset units)")
    if len(bands) <= max_curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run(cfg: DictConfig) -> dict:
    import torch
    from tqdm import tqdm

    from xanesdiff.datasets.errors import XanesdiffInputError
    from xanesdiff.datasets.spectra_io import write_spectra_csv
    from xanesdiff.datasets.structures import read_structures
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.runtime import resolve_device

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    paths = [Path(p) for p in (cfg.structures or [])]
    if not paths:
        raise XanesdiffInputError("no structure files given; usage: xanesdiff predict FILE...",
                                  "structures")
    for p in paths:
        if not p.exists():
            raise XanesdiffInputError("structure file does not exist", str(p))
    n_frames = sum(len(read_structures(p)) for p in paths)  # validates every file up front
    surrogate = load_surrogate(cfg.checkpoint, device=resolve_device(cfg.device),
                               backbone_path=cfg.backbone_path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    with tqdm(total=n_frames, desc="predict", unit="frame", disable=None) as progress:
        for p in paths:
            for name, mean in predict_file(surrogate, p, out, bool(cfg.per_site), bool(cfg.plot),
                                           progress):
                summary[name] = mean
    write_spectra_csv(out / "summary.csv", surrogate.grid.energies_eV, summary)
    print(f"predicted {len(summary)} frame(s) from {len(paths)} file(s) -> {out}")
    return {"out": str(out), "frames": list(summary)}


@hydra_app("predict")
def _hydra_main(cfg: DictConfig):
    run(cfg)
    return 0


def main() -> int:
    sys.argv = [sys.argv[0], *split_arguments(sys.argv[1:])]
    _hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
