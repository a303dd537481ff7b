"""Benchmark of editing a given structure (`xanesdiff generate start=FILE`) → benchmarks/edit.json.

    python -m xanesdiff.scripts.benchmark_edit [--noise 0.1 0.2 0.3] [--seeds 3] [--threads 2]

Start: one frame of the a-C network nearest `--density`. At each start noise σ (Å), each seed
re-noises it and denoises twice with the same noise: guided by `pi_star_up` (π* window
intensity ≥ 1.2× the start's, as `generate start=… steer=pi_star_up` does) and unguided (the
prior alone: what re-noising does by itself). Judged by the shipped judge surrogate (M3GNet-MatPES
features), not the guide. Sampler and guidance settings are exactly `xanesdiff generate`'s.
Reported per σ: the judged π* change against the start, hybridisation changes, the RMS
displacement of the atoms from the start (minimum image), CN1, the closest pair, seconds per
structure; also for guided edits of only the atoms within `--region-radius` of the cell centre
(`guided_region`, `generate start_region=…`). The shipped models have seen the start's network
(it is training data).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xanesdiff.analysis.structure import displacements, hybridization_fractions
from xanesdiff.datasets.dataset import load_dataset
from xanesdiff.datasets.structures import minimum_distance
from xanesdiff.forward.surrogate import load_surrogate
from xanesdiff.guidance.features import SpectralFeature
from xanesdiff.guidance.report import write_json
from xanesdiff.guidance.request import (build_terms, compose_generate_config, edit_structure,
                                        load_configured_prior, make_generator, region_mask)
from xanesdiff.guidance.validation import predict_members


def edit_row(generator, terms, start, noise_A: float, seed: int, guided: bool, judge_pi,
             mobile=None) -> dict:
    clock = time.perf_counter()
    atoms, log = edit_structure(generator, terms, None, start, noise_A, seed, guided, mobile)
    return {"seed": seed, "guided": guided, "region": mobile is not None,
            "wall_s": time.perf_counter() - clock,
            "pi_star": judge_pi(atoms), **hybridization_fractions(atoms),
            "rms_displacement_A": log["start_rms_displacement_A"],
            "moved_over_0.5A": float(np.mean(displacements(start, atoms) > 0.5)),
            "dmin_A": minimum_distance(atoms)}


def summarise(rows: list[dict], start_row: dict) -> dict:
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {"pi_star_gain": mean("pi_star") / start_row["pi_star"] - 1.0,
            **{f"{k}_change": mean(k) - start_row[k] for k in ("sp", "sp2", "sp3")},
            "cn1": mean("cn1"), "cn5plus": mean("cn5plus"),
            "rms_displacement_A": mean("rms_displacement_A"),
            "moved_over_0.5A": mean("moved_over_0.5A"),
            "dmin_A": min(r["dmin_A"] for r in rows), "s_per_structure": mean("wall_s")}


def main(argv=None) -> None:
    from xanesdiff.runtime import configure_process

    configure_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=2.5,
                        help="g/cm³: the start is a frame of the network nearest this density")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                        help="start noise levels σ (Å)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--region-radius", type=float, default=6.0,
                        help="Å: guided edits of only the atoms this close to the cell centre "
                             "are also run (guided_region)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra generate-config overrides")
    parser.add_argument("--out", default="benchmarks/edit.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}

    dataset = load_dataset()
    network = min(dataset.networks, key=lambda n: abs(dataset.network_density(n) - args.density))
    frame = dataset.frames_of([network])[0]
    start = frame.atoms
    cfg = compose_generate_config(["steer=pi_star_up", *args.set])
    surrogate, judge = load_surrogate(cfg.models.surrogate), load_surrogate("judge")
    terms = [t.bind(surrogate) for t in build_terms(cfg)]
    prior = load_configured_prior(cfg)
    generator = make_generator(cfg, prior, surrogate, terms)
    window = next(t.window_eV for t in terms if hasattr(t, "window_eV"))
    measure = SpectralFeature("intensity", window, value=0.0, surrogate=judge)

    def judge_pi(atoms) -> float:
        return float(measure.measure(torch.as_tensor(predict_members(judge, atoms).mean(0))))

    start_row = {"pi_star": judge_pi(start), **hybridization_fractions(start)}
    centre = start.cell.array.sum(0) / 2
    mobile = region_mask(start, {"center_A": centre.tolist(), "radius_A": args.region_radius})
    result.update({"command": "python -m xanesdiff.scripts.benchmark_edit "
                              + " ".join(sys.argv[1:] if argv is None else argv),
                   "machine": f"{platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                   "start": {"frame": frame.name,
                             "density_g_cm3": dataset.network_density(network), **start_row},
                   "steer": "pi_star_up (π* ≥ 1.2 × the start's, by the guide)",
                   "region": {"center": "cell centre", "radius_A": args.region_radius,
                              "mobile_atoms": int(mobile.sum())}})
    by_noise = result.setdefault("by_noise", {})
    for noise in args.noise:
        key = f"{noise:g}"
        if key in by_noise:
            continue
        rows = [edit_row(generator, terms, start, noise, seed, guided, judge_pi)
                for seed in range(args.seeds) for guided in (True, False)]
        rows += [edit_row(generator, terms, start, noise, seed, True, judge_pi, mobile)
                 for seed in range(args.seeds)]
        by_noise[key] = {
            "guided": summarise([r for r in rows if r["guided"] and not r["region"]], start_row),
            "unguided": summarise([r for r in rows if not r["guided"]], start_row),
            "guided_region": summarise([r for r in rows if r["region"]], start_row),
            "n_seeds": args.seeds, "rows": rows}
        write_json(out, result)  # after every noise level: an interrupted run keeps it
        print(key, json.dumps({k: by_noise[key][k] for k in ("guided", "unguided",
                                                              "guided_region")}, default=float))


if __name__ == "__main__":
    main()
