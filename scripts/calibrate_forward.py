"""Held-out error of a surrogate checkpoint → `<checkpoint>.heldout.json` beside it.

    python -m xanesdiff.scripts.calibrate_forward [--checkpoint default|fast|judge|PATH] [--threads 1]

The checkpoint's own recipe (featuriser, head and training settings, read from its config) is
retrained once per a-C network with that network left out, and the held-out frames' predicted mean
spectra are compared with the simulated ones (`xanesdiff.forward.heldout_error`). `predict` then
reports the band √(σ_ensemble² + rms²) next to the ensemble's own σ. A few minutes on one core
for the frozen-feature surrogates (features are computed once and reused across the folds).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def heldout_errors(config: dict, dataset, progress: bool = True
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({network: (frames, M) predicted − true mean spectra}, {network: (frames, M) ensemble σ
    of those predictions}) with the recipe in `config` (a surrogate checkpoint's config)
    retrained without that network."""
    from tqdm import tqdm

    from xanesdiff.datasets.splits import leave_one_network_out
    from xanesdiff.forward.m3gnet_features import FeatureCache
    from xanesdiff.forward.surrogate import (build_featurizer, featurizer_has_own_weights,
                                             train_surrogate)
    from xanesdiff.guidance.validation import predict_members

    featurizer_cfg = config["featurizer"]
    head = {k: v for k, v in config["head"].items() if k not in ("in_dim", "n_energies")}
    frozen = not featurizer_has_own_weights(featurizer_cfg)
    featurizer = build_featurizer(featurizer_cfg) if frozen else featurizer_cfg
    cache = FeatureCache(featurizer) if frozen else None
    errors, spreads = {}, {}
    for split in tqdm(leave_one_network_out(dataset), desc="held-out networks", disable=not progress):
        surrogate = train_surrogate(split.train, dataset.grid, featurizer, head, config["train"],
                                    absorber=dataset.absorber, cache=cache)
        members = [predict_members(surrogate, f.atoms) for f in split.test]  # (K, M) each
        errors[split.held_out_network] = np.stack(
            [m.mean(0) - f.mean_spectrum for m, f in zip(members, split.test)])
        spreads[split.held_out_network] = np.stack([m.std(0) for m in members])
    return errors, spreads


def main(argv: list[str] | None = None) -> int:
    import torch

    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.forward.heldout_error import fit_heldout_error, save_heldout_error
    from xanesdiff.forward.surrogate import load_surrogate, surrogate_checkpoint_path
    from xanesdiff.runtime import configure_process

    configure_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default",
                        help="a shipped surrogate's name (default, fast, judge) or a path")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = surrogate_checkpoint_path(args.checkpoint)
    surrogate = load_surrogate(path)
    dataset = load_dataset()
    excluded = set(surrogate.config.get("excluded_networks") or [])
    if excluded:  # what the checkpoint never saw stays out of its folds too
        dataset.frames = [f for f in dataset.frames if f.network not in excluded]
    errors, spreads = heldout_errors(surrogate.config, dataset)
    error = fit_heldout_error(errors, dataset.grid.energies_eV, spreads)
    error.command = ("python -m xanesdiff.scripts.calibrate_forward "
                     + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    out = save_heldout_error(path, error)
    maes = ", ".join(f"{name} {mae:.4f}" for name, mae in error.network_mae.items())
    print(f"{out}: held-out mean-spectrum MAE {maes}; rms per energy {error.rms.min():.4f}–"
          f"{error.rms.max():.4f} (median {np.median(error.rms):.4f}); ±band covers "
          f"{error.coverage:.0%} of a new network's errors, ±σ_ensemble alone "
          f"{error.ensemble_coverage:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
