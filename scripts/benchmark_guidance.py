"""Benchmark of spectrum-guided generation (issue 5) → benchmarks/guidance.json.

    python -m xanesdiff.scripts.benchmark_guidance [--n-samples 2] [--out benchmarks/guidance.json]

Targets: for each held-out interior density (2.0, 2.5, 3.0) the *simulated* mean spectrum of
one frame of that network. The guidance surrogate (the shipped default's recipe: M3GNet-MP
features + radial/angular histograms, seed 0; `--guide fast`: the histograms alone) and the judge (the shipped judge's recipe:
M3GNet-MatPES features, seed 1) are both retrained here without that network; the prior is the
shipped one trained without that density when it exists (`checkpoints/prior_without_D.pt`,
reported as `prior_held_out: true`), else the default prior (`false`: the prior has seen the
network, only the surrogates have not). The density is not given: it is inferred, by default
from reference spectra that leave the held-out network out too (`--density-search reference`), or
by scoring prior samples over a density grid (`--density-search scan`).

Steering: at 2.5 g/cm³ with the shipped models, structures generated with `pi_star_up`
(π* window intensity ≥ 1.2× the unguided structure's) against unguided structures of the same
seeds, judged by the shipped judge surrogate. Sampler and guidance settings are exactly those of
`xanesdiff generate` (configs/generate.yaml).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

import xanesdiff
from xanesdiff.analysis.structure import hybridization_fractions
from xanesdiff.datasets.dataset import load_dataset
from xanesdiff.datasets.splits import leave_one_density_out
from xanesdiff.datasets.structures import minimum_distance
from xanesdiff.diffusion.prior import load_prior
from xanesdiff.forward.surrogate import SHIPPED_SURROGATES, load_surrogate, train_surrogate
from xanesdiff.guidance.features import SpectralFeature
from xanesdiff.guidance.report import write_json
from xanesdiff.guidance.request import build_terms, compose_generate_config, make_generator
from xanesdiff.guidance.validation import predict_members, spectral_match

CHECKPOINTS = xanesdiff.PACKAGE_ROOT / "checkpoints"


def recipe_of(checkpoint: str) -> dict:
    """Featuriser, head and training settings of a shipped surrogate, to retrain it elsewhere."""
    ckpt = torch.load(CHECKPOINTS / checkpoint, map_location="cpu", weights_only=False)
    head = {k: v for k, v in ckpt["head_config"].items() if k not in ("in_dim", "n_energies")}
    return {"featurizer": ckpt["config"]["featurizer"], "head": head,
            "train": ckpt["config"].get("train")}


def generate_config(args, *extra):
    """The shipped `xanesdiff generate` settings (few sampler steps with --quick)."""
    quick = ["sampler.n_steps=6", "sampler.n_corrector=1", "sampler.final_corrector_steps=1"]
    if args.quick and args.density_search == "scan":
        quick.append("density_search.coarse_g_cm3=[2.0,3.0]")
    return compose_generate_config([*(quick if args.quick else []),
                                    f"density_search={args.density_search}",
                                    f"guided_score.refresh_every={args.refresh_every}", *extra,
                                    *args.set])


def prior_for(density: float, priors: Path = CHECKPOINTS):
    """The prior trained without `density`'s network if `priors` holds one, else the default."""
    path = priors / f"prior_without_{density:.1f}.pt"
    if path.exists():
        return load_prior(path), True, path.name
    return load_prior(priors / "prior_default.pt"), False, "prior_default.pt"


def judged_spectrum(judge, frames) -> np.ndarray:
    return np.mean([predict_members(judge, a).mean(0) for a in frames], axis=0)


def held_out_target(dataset, density: float, args) -> dict:
    split = leave_one_density_out(dataset, density)
    guide_file = SHIPPED_SURROGATES.get(args.guide, args.guide)
    guide = train_surrogate(split.train, dataset.grid, **recipe_of(guide_file))
    judge = train_surrogate(split.train, dataset.grid, **recipe_of("forward_judge.pt"))
    prior, prior_held_out, prior_name = prior_for(density, xanesdiff.PACKAGE_ROOT / args.priors)
    target = split.test[0].mean_spectrum.astype(np.float64)
    cfg = generate_config(args, *([f"density_search.exclude_g_cm3=[{density}]"]
                                   if args.density_search == "reference" else []))
    terms = [term.bind(guide, target) for term in build_terms(OmegaConf.merge(
        cfg, {"target": "held-out frame"}))]
    generator = make_generator(cfg, prior, guide, terms)
    search = hydra.utils.instantiate(cfg.density_search, _convert_="all")
    start = time.perf_counter()
    inferred, scan = search.run(generator, target)
    frames = [generator.generate(inferred, seed)[0] for seed in range(args.n_samples)]
    judged = judged_spectrum(judge, frames)
    generated = hybridization_fractions(frames)
    true = hybridization_fractions([f.atoms for f in split.test])
    guide_pred = np.mean([predict_members(guide, a).mean(0) for a in frames], axis=0)
    return {"held_out_density": round(float(np.mean([f.density_g_cm3 for f in split.test])), 3),
            "inferred_density": inferred,
            "density_scan": [s for s in scan if s["stage"] != "interpolated"],  # keep it short
            "sp3": generated["sp3"], "sp3_true": true["sp3"],
            "sp3_err": abs(generated["sp3"] - true["sp3"]), "cn1": generated["cn1"],
            "dmin": min(minimum_distance(a) for a in frames),
            "judged_mae": spectral_match(judged, target)["mae"],
            "judged_spearman": spectral_match(judged, target)["spearman"],
            "guide_mae": spectral_match(guide_pred, target)["mae"],
            "prior": prior_name, "prior_held_out": prior_held_out, "guide": args.guide,
            "target_frame": split.test[0].name, "n_samples": len(frames),
            "wall_s": time.perf_counter() - start}


def steering(args) -> dict:
    prior = load_prior(xanesdiff.PACKAGE_ROOT / args.priors / "prior_default.pt")
    surrogate = load_surrogate()
    judge = load_surrogate("judge")
    cfg = generate_config(args, "steer=pi_star_up")
    (term,) = [t.bind(surrogate) for t in build_terms(cfg)]
    generator = make_generator(cfg, prior, surrogate, [term])
    measure = SpectralFeature("intensity", term.window_eV, value=0.0, surrogate=judge)
    plain, steered = [], []
    for seed in range(args.steer_samples):
        atoms, _ = generator.generate(args.steer_density, seed, guided=False)
        term.set_reference(torch.as_tensor(predict_members(surrogate, atoms).mean(0)))
        plain.append(atoms)
        steered.append(generator.generate(args.steer_density, seed, guided=True)[0])
    pi = [float(measure.measure(torch.as_tensor(judged_spectrum(judge, s)))) for s in
          (plain, steered)]
    h_plain, h_steered = hybridization_fractions(plain), hybridization_fractions(steered)
    return {"density_g_cm3": args.steer_density, "pi_star_unguided": pi[0],
            "pi_star_steered": pi[1], "pi_star_gain": pi[1] / pi[0] - 1.0,
            "sp2_unguided": h_plain["sp2"], "sp2_steered": h_steered["sp2"],
            "sp2_change": h_steered["sp2"] - h_plain["sp2"],
            "sp_change": h_steered["sp"] - h_plain["sp"],
            "sp3_change": h_steered["sp3"] - h_plain["sp3"], "cn1": h_steered["cn1"],
            "dmin": min(minimum_distance(a) for a in steered),
            "n_samples": args.steer_samples}


def main(argv=None) -> None:
    from xanesdiff.runtime import configure_process

    configure_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=float, nargs="*", default=[2.0, 2.5, 3.0])
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--steer-density", type=float, default=2.5)
    parser.add_argument("--steer-samples", type=int, default=2)
    parser.add_argument("--refresh-every", type=int, default=3)
    parser.add_argument("--density-search", choices=["reference", "scan"], default="reference",
                        help="configs/density_search/ method used to infer the density")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra generate-config overrides, e.g. guided_score.max_ratio=4")
    parser.add_argument("--guide", default="default",
                        help="recipe of the guidance surrogate retrained per split: a shipped "
                             "name (default | fast) or a checkpoint file in checkpoints/")
    parser.add_argument("--priors", default="checkpoints",
                        help="folder (relative to the project root) with prior_default.pt and "
                             "prior_without_D.pt: a candidate set of priors (default: shipped)")
    parser.add_argument("--skip-steering", action="store_true")
    parser.add_argument("--quick", action="store_true", help="few sampler steps (smoke test)")
    parser.add_argument("--out", default="benchmarks/guidance.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("density_search", args.density_search) != args.density_search:
        raise SystemExit(f"{out} holds results of density_search={result['density_search']}; "
                         f"choose another --out")
    result["density_search"] = args.density_search
    done = {round(t["held_out_density"], 1) for t in result.get("targets", [])}
    import sys

    result.update({"command": "python -m xanesdiff.scripts.benchmark_guidance "
                              + " ".join(sys.argv[1:] if argv is None else argv),
                   "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                   "priors": args.priors})
    dataset = load_dataset()
    for density in args.held_out:
        if round(density, 1) in done:
            continue
        result.setdefault("targets", []).append(held_out_target(dataset, density, args))
        write_json(out, result)  # after every density: an interrupted run keeps what it finished
        print(json.dumps({k: v for k, v in result["targets"][-1].items()
                          if k != "density_scan"}, default=float))
    if not args.skip_steering and "steering" not in result:
        result["steering"] = steering(args)
        write_json(out, result)
        print(json.dumps(result["steering"]))


if __name__ == "__main__":
    main()
