"""Guided fidelity on the training networks, for comparing generate settings side by side → JSON.

    python -m xanesdiff.scripts.benchmark_guided_fidelity OUT.json [KEY=VALUE ...]
        [--densities 1.5 2.0 2.5 3.0] [--n-samples 8] [--threads 1]

For each density, `--n-samples` guided 216-atom cells (seeds 0, 1, …) with the shipped models and
the `generate` settings plus the given overrides (e.g. `sampler=pc_quick`,
`guidance.spectrum.heldout_weight=1.0`); target: the mean spectrum of the network's first frame;
generated at the network's density. Reported per density: CN1, CN5+, |Δsp3|, |Δsp2| (and Δsp3,
Δsp2 with their signs: sample − reference), ΔRDF peak
against the network's frames, the closest pair, and the spectral MAE by the default surrogate
(`mae`) and the independent judge (`judge_mae`), plus seconds per sample. The models were trained
on these networks, so this compares settings; held-out accuracy is `benchmark_guidance`'s job.
(The study behind `session13_guided_steps` and `session14_refresh_every` in speed.json and
`session15_heldout_weight` in guidance.json.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def fidelity_rows(overrides: list[str], densities, n_samples: int, progress=print) -> dict:
    import numpy as np
    from omegaconf import OmegaConf

    from xanesdiff.analysis.structure import (compare_sets, hybridization_fractions,
                                              minimum_distance)
    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.request import (build_terms, compose_generate_config,
                                            load_configured_prior, make_generator)
    from xanesdiff.guidance.validation import predict_members, spectral_match

    dataset = load_dataset()
    cfg = OmegaConf.merge(compose_generate_config(overrides), {"target": "first frame"})
    prior, guide = load_configured_prior(cfg), load_surrogate(cfg.models.surrogate)
    validator, judge = load_surrogate("default"), load_surrogate("judge")
    rows = {}
    for rho in densities:
        network = min(dataset.networks, key=lambda n: abs(dataset.network_density(n) - rho))
        density = dataset.network_density(network)
        frames_of_network = dataset.frames_of([network])
        target = frames_of_network[0].mean_spectrum.astype(np.float64)
        terms = [term.bind(guide, target) for term in build_terms(cfg)]
        generator = make_generator(cfg, prior, guide, terms)
        start = time.perf_counter()
        samples = [generator.generate(density, seed)[0] for seed in range(n_samples)]
        seconds = (time.perf_counter() - start) / n_samples
        hybrid = hybridization_fractions(samples)
        comparison = compare_sets(samples, [f.atoms for f in frames_of_network])
        row = {"density": density, "s": seconds, "cn1": hybrid["cn1"],
               "cn5plus": hybrid["cn5plus"], "sp3_err": comparison["sp3_err"],
               "sp2_err": comparison["sp2_err"], "sp3_diff": comparison["sp3_diff"],
               "sp2_diff": comparison["sp2_diff"], "rdf_peak_err": comparison["rdf_peak_err"],
               "dmin": float(min(minimum_distance(a) for a in samples))}
        for key, model in (("mae", validator), ("judge_mae", judge)):
            row[key] = float(np.mean([spectral_match(predict_members(model, a).mean(0),
                                                     target)["mae"] for a in samples]))
        rows[f"{density:.2f}"] = row
        progress(json.dumps({f"{density:.2f}": {k: round(v, 4) for k, v in row.items()}}))
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    from xanesdiff.datasets.spectra_io import atomic_write_text
    from xanesdiff.runtime import configure_process

    configure_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("overrides", nargs="*", help="generate overrides, KEY=VALUE")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = fidelity_rows(args.overrides, args.densities, args.n_samples,
                         progress=lambda line: print(line, flush=True))
    command = ("python -m xanesdiff.scripts.benchmark_guided_fidelity "
               + " ".join(sys.argv[1:] if argv is None else argv))
    atomic_write_text(args.out, json.dumps({"overrides": args.overrides, "command": command,
                                            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
