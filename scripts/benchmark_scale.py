"""Scaling of sampling with the atom count → benchmarks/scale.json.

    python -m xanesdiff.scripts.benchmark_scale [--atoms 216 1000 3000 10000] [--large 10000]

Each point runs in its own process (so its peak memory is its own): one prior score step
(neighbour list + e3nn forward) and one guided step (prior forward+backward through x̂0 plus the
surrogate's forward+backward on the whole cell) at 2.5 g/cm³ with the default (M3GNet) and the
fast (histogram) guidance surrogates side by side, repeated, the median kept. The exponent is the
slope of log(time) against log(atoms). `--large N` also samples one N-atom cell with the default
sampler (prior only) and compares its structure with 216-atom samples; `--large-guided` adds one
guided N-atom sample with the `generate` defaults and the `--surrogate` guide (in its own
process; `--atoms` with no values keeps the curve already in --out and only adds large cells).
`--validation N…` times validating N-atom cells (default surrogate and judge, no gradient).
`--prior` (default | fast | a checkpoint) is the prior of every measurement. `--device cuda`
measures on a GPU (times synchronised with it, peak memory the GPU's); write such a run to its
own file (`--out benchmarks/scale_gpu.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DENSITY = 2.5


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (GPU kernels run async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_mb(device: torch.device) -> float:
    """Peak memory of this process so far (MB): the GPU's allocations on CUDA, else max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU"


GUIDES = {"default": "guided_step_s", "fast": "fast_guided_step_s"}
"""Shipped guidance surrogates measured by a guided point, and the key of their step time."""


def measure_point(n_atoms: int, guided: bool, repeats: int, prior_name: str = "default",
                  device: torch.device = torch.device("cpu"), guides=tuple(GUIDES),
                  recompute: str = "auto") -> dict:
    """Prior step time (s) and, if `guided`, guided step times with each of `guides`.
    `recompute`: auto (the score model decides by memory), on or off (forced)."""
    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.diffusion.sampling import cubic_cell_for_density
    from xanesdiff.datasets.graph import wrap_positions

    prior = load_prior(prior_name, device=device)
    if recompute != "auto":  # every score model inside (an autoguided prior has two)
        for model in prior.score_model.modules():
            if hasattr(model, "recompute_min_edges"):
                model.recompute_min_edges = 0 if recompute == "on" else 2 ** 62
    cell = torch.tensor(cubic_cell_for_density(n_atoms, DENSITY), dtype=torch.float32)
    numbers = torch.full((n_atoms,), 6, device=device)
    generator = torch.Generator().manual_seed(0)
    pos = prior.schedule.prior_sampling(n_atoms, cell, generator).to(device)
    cell = cell.to(device)
    result = {"atoms": n_atoms}
    with torch.no_grad():
        prior.score(pos, cell, numbers, 0.5)
        start = clock(device)
        for _ in range(repeats):
            pos = wrap_positions(pos + 0.05 * torch.randn_like(pos), cell)  # moves: cache checks
            prior.score(pos, cell, numbers, 0.5)
        result["step_s"] = (clock(device) - start) / repeats
    if guided:
        from xanesdiff.forward.surrogate import load_surrogate
        from xanesdiff.guidance.guided_score import GuidedScore
        from xanesdiff.guidance.pipeline import guided_step_mb
        from xanesdiff.guidance.spectrum import SpectrumLikelihood
        from xanesdiff.runtime import fit_kept_memory, memory_kept

        surrogates = {name: load_surrogate(name, device=device) for name in guides}
        fit_kept_memory(max(guided_step_mb(surrogate, prior.score_model, n_atoms, cell, device)
                            for surrogate in surrogates.values()),
                        device=device)  # as GuidedGenerator does for its guide
        result["large_blocks_mapped"] = not memory_kept()

        for name, surrogate in surrogates.items():
            key = GUIDES[name]
            target = np.full(surrogate.grid.n_points, 0.22)
            score = GuidedScore(prior, cell, numbers, [SpectrumLikelihood(surrogate, target)])
            score(pos, 0.3)  # warm-up (the first call of a size also sizes the allocator's heap)
            times = []
            for _ in range(repeats):
                start = clock(device)
                score(pos, 0.3)
                times.append(clock(device) - start)
            result[key] = float(np.median(times))
    result["peak_mb"] = peak_mb(device)
    if guided:
        result["recompute"] = recompute
    return result


def large_cell(n_atoms: int, n_small: int, n_steps: int, prior_name: str = "default",
               device: torch.device = torch.device("cpu")) -> dict:
    """One `n_atoms` cell and `n_small` 216-atom cells, same sampler (Euler–Maruyama, `n_steps`,
    5 final corrector steps), compared by their hybridisation."""
    from xanesdiff.analysis.structure import hybridization_fractions
    from xanesdiff.diffusion.prior import load_prior
    from xanesdiff.diffusion.samplers import EulerMaruyama
    from xanesdiff.diffusion.sampling import sample_structures

    prior = load_prior(prior_name, device=device)
    sampler = EulerMaruyama(prior.schedule, n_steps=n_steps, final_corrector_steps=5)
    start = clock(device)
    (big,) = sample_structures(prior, n_atoms=n_atoms, density_g_cm3=DENSITY, seed=0,
                               sampler=sampler)
    sample_s = clock(device) - start
    small = sample_structures(prior, n_atoms=216, density_g_cm3=DENSITY, n_samples=n_small,
                              seed=1, sampler=sampler)
    hb, hs = hybridization_fractions(big), hybridization_fractions(small)
    return {"atoms": n_atoms, "sample_s": sample_s, "sampler": f"em, {n_steps} steps",
            "peak_mb": peak_mb(device), "sp3": hb["sp3"], "sp3_216": hs["sp3"],
            "sp3_err": abs(hb["sp3"] - hs["sp3"]), "cn1": hb["cn1"], "cn1_216": hs["cn1"],
            "guided_s": None,
            "note": "guided sample not run (--large-guided); guided_s_estimate: the default "
                    "sampler's score calls times the measured step times of this size"}


def large_guided(n_atoms: int, n_small: int, guide: str = "default",
                 prior_name: str = "default", overrides: list[str] = (),
                 device: torch.device = torch.device("cpu")) -> dict:
    """One guided `n_atoms` cell with the shipped `generate` settings (density given, plus
    `overrides` such as `sampler=pc_quick`) and the `guide` surrogate, target the mean spectrum
    of a 2.49 g/cm³ frame; compared with `n_small` guided 216-atom cells. Spectra are judged as
    `generate` does: by the default surrogate (validator) and the independent judge."""
    from omegaconf import OmegaConf

    from xanesdiff.analysis.structure import hybridization_fractions
    from xanesdiff.datasets.dataset import load_dataset
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.request import (build_terms, compose_generate_config,
                                            load_configured_prior, make_generator)
    from xanesdiff.guidance.validation import predict_members, spectral_match
    from xanesdiff.runtime import memory_kept

    frame = next(f for f in load_dataset().frames if f.network == "rho2.49")
    target = frame.mean_spectrum.astype(np.float64)
    cfg = OmegaConf.merge(compose_generate_config([f"models.surrogate={guide}",
                                                   f"models.prior={prior_name}", *overrides]),
                          {"target": frame.name})
    prior = load_configured_prior(cfg, device)
    surrogate = load_surrogate(cfg.models.surrogate, device=device)
    validator, judge = (load_surrogate(name, device=device) for name in ("default", "judge"))
    terms = [term.bind(surrogate, target) for term in build_terms(cfg)]
    results = {}
    for n, seeds in ((n_atoms, [0]), (216, range(1, n_small + 1))):
        generator = make_generator(cfg, prior, surrogate, terms, n_atoms=n)
        start = clock(device)
        frames = [generator.generate(DENSITY, seed)[0] for seed in seeds]
        elapsed = clock(device) - start
        maes = {name: float(np.mean([spectral_match(predict_members(model, a).mean(0),
                                                    target)["mae"] for a in frames]))
                for name, model in (("mae", validator), ("judge_mae", judge))}
        results[n] = {"s": elapsed, **maes, **hybridization_fractions(frames)}
    big, small = results[n_atoms], results[216]
    return {"atoms": n_atoms, "guided_s": big["s"], "target": frame.name,
            "guided_surrogate": guide, "prior": prior_name,
            "guided_mae": big["mae"], "guided_mae_216": small["mae"],
            "guided_judge_mae": big["judge_mae"], "guided_judge_mae_216": small["judge_mae"],
            "guided_sp3": big["sp3"], "guided_sp3_216": small["sp3"],
            "guided_sp3_err": abs(big["sp3"] - small["sp3"]), "guided_cn1": big["cn1"],
            "guided_peak_mb": peak_mb(device),
            "guided_large_blocks_mapped": not memory_kept(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "guided_overrides": list(overrides),
            "guided_sampler": f"generate defaults ({cfg.sampler._target_.rsplit('.', 1)[1]}, "
                              f"{cfg.sampler.n_steps} steps, refresh_every "
                              f"{cfg.guided_score.refresh_every}), density given"}


def validation_point(n_atoms: int, device: torch.device = torch.device("cpu")) -> dict:
    """Time (s) and peak memory (MB) of validating one `n_atoms` cell (random positions at
    2.5 g/cm³) as `generate` does: the default surrogate, then the judge, without gradient.
    Peaks are the process's (loaded models included), with validation's own estimate beside."""
    from ase import Atoms

    from xanesdiff.diffusion.sampling import cubic_cell_for_density
    from xanesdiff.forward.surrogate import load_surrogate
    from xanesdiff.guidance.validation import prediction_mb, validate_spectrum

    cell = np.asarray(cubic_cell_for_density(n_atoms, DENSITY))
    positions = np.random.default_rng(0).random((n_atoms, 3)) @ cell
    atoms = Atoms(numbers=np.full(n_atoms, 6), positions=positions, cell=cell, pbc=True)
    result = {"atoms": n_atoms}
    for name in ("default", "judge"):
        surrogate = load_surrogate(name, device=device)
        result[f"{name}_loaded_mb"] = peak_mb(device)
        start = clock(device)
        validate_spectrum(atoms, None, surrogate)
        result[f"{name}_s"] = clock(device) - start
        result[f"{name}_peak_mb"] = peak_mb(device)
        result[f"{name}_estimate_mb"] = prediction_mb(surrogate, n_atoms, atoms.get_volume())
    return result


def sample_calls() -> tuple[int, int]:
    """(score calls, guidance refreshes) of one `generate` sample with the shipped settings,
    counted by running its sampler on a two-atom dummy with a zero score: a call refreshes the
    guidance when a guidance term is active at its t and it is the first, or every
    `refresh_every`-th, active call (as `GuidedScore` does)."""
    from hydra.utils import instantiate

    from xanesdiff.diffusion.schedule import VESchedule
    from xanesdiff.guidance.base import TimeWindow
    from xanesdiff.guidance.request import compose_generate_config

    cfg = compose_generate_config([])
    sampler = instantiate(cfg.sampler, schedule=VESchedule())
    times: list[float] = []

    def record(pos, t):
        times.append(float(t))
        return torch.zeros_like(pos)

    sampler.sample(torch.zeros(2, 3), record, lambda x: x, torch.Generator().manual_seed(0))
    windows = [TimeWindow(**spec.schedule) for spec in cfg.guidance.values()]
    active = sum(1 for t in times if any(window(t) > 0 for window in windows))
    return len(times), -(-active // cfg.guided_score.refresh_every)


def add_sample_estimates(points: list[dict]) -> None:
    """Whole-sample times (s) of the default `generate` sampler from the measured step times."""
    calls, guided_calls = sample_calls()
    for p in points:
        p["sample_s"] = calls * p["step_s"]
        p["sample_s_note"] = f"estimated: {calls} score calls"
        steps = [key for key in GUIDES.values() if key in p]
        for step in steps:  # guided_step_s -> guided_sample_s, fast_guided_… alike
            p[step.replace("_step_s", "_sample_s")] = (guided_calls * p[step]
                                                        + (calls - guided_calls) * p["step_s"])
        if steps:
            p["sample_s_note"] += f", {guided_calls} of them guided when guided"


def child_result(*options: str) -> dict:
    """Run this benchmark with `options` in a child process (so its peak memory is its own) and
    return the JSON object it prints last."""
    cmd = [sys.executable, "-m", "xanesdiff.scripts.benchmark_scale", *options]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_points(args) -> list[dict]:
    """Each atom count in its own process, so its peak memory is its own."""
    points = []
    for n in args.atoms:
        options = ["--point", str(n), "--repeats", str(args.repeats), "--threads",
                   str(args.threads), "--prior", args.prior, "--device", args.device]
        if n <= args.guided_max:
            options += ["--guided", "--guides", *args.guides, "--recompute", args.recompute]
        points.append(child_result(*options))
        print(points[-1], flush=True)
    add_sample_estimates(points)
    return points


def fit_exponents(points: list[dict]) -> dict:
    """Slopes of log(time) against log(atoms) for the prior step and the guided step."""
    def slope(pts, key):
        if len(pts) < 2:
            return None
        return float(np.polyfit(np.log([p["atoms"] for p in pts]),
                                np.log([p[key] for p in pts]), 1)[0])

    guided = [p for p in points if "guided_step_s" in p]
    return {"exponent": slope(points, "step_s"),
            "guided_exponent": slope([p for p in guided if not p.get("large_blocks_mapped")],
                                     "guided_step_s"),
            "guided_exponent_all": slope(guided, "guided_step_s"),
            "fast_guided_exponent": slope([p for p in points if "fast_guided_step_s" in p],
                                          "fast_guided_step_s"),
            "guided_exponent_note": "guided_exponent: points whose allocator kept freed memory; "
                                    "_all: also cells too large for that on this machine "
                                    "(large blocks mapped afresh, M3GNet recomputed)"}


def main(argv=None) -> None:
    from xanesdiff.runtime import configure_process, resolve_device

    configure_process()
    from xanesdiff.guidance.report import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, nargs="*", default=[216, 1000, 3000, 10000],
                        help="atom counts of the step curve; none: keep the curve in --out")
    parser.add_argument("--guided-max", type=int, default=3000,
                        help="largest cell for the guided step (M3GNet memory grows fast)")
    parser.add_argument("--guides", nargs="+", choices=list(GUIDES), default=list(GUIDES),
                        help="guidance surrogates of the guided step")
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                        help="whether the prior's backward pass recomputes its messages "
                             "(auto: when the kept ones would crowd memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--large", type=int, default=0, help="also sample one cell this large")
    parser.add_argument("--large-steps", type=int, default=100)
    parser.add_argument("--large-guided", action="store_true",
                        help="and one guided sample of the --large cell (its own process)")
    parser.add_argument("--surrogate", default="default",
                        help="guide of the --large-guided sample: default | fast | a checkpoint")
    parser.add_argument("--prior", default="default",
                        help="prior of every measurement: default | fast | painn | a checkpoint")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="generate overrides of the --large-guided sample, e.g. sampler=pc_quick")
    parser.add_argument("--validation", type=int, nargs="+", default=[], metavar="ATOMS",
                        help="also time validating cells of these sizes (each in its own process)")
    parser.add_argument("--small-samples", type=int, default=4,
                        help="216-atom cells the large cells are compared with")
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--guided", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--guided-cell", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--validate-cell", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda, cuda:N or auto (the GPU when there is one)")
    parser.add_argument("--out", default="benchmarks/scale.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.point:
        print(json.dumps(measure_point(args.point, args.guided, args.repeats, args.prior,
                                       device, args.guides, args.recompute)))
        return
    if args.validate_cell:
        print(json.dumps(validation_point(args.validate_cell, device)))
        return
    if args.guided_cell:
        print(json.dumps(large_guided(args.guided_cell, n_small=args.small_samples,
                                      guide=args.surrogate, prior_name=args.prior,
                                      overrides=args.set, device=device)))
        return
    command = "python -m xanesdiff.scripts.benchmark_scale " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.atoms:
        points = run_points(args)
        result = {"points": points, **fit_exponents(points), "prior": args.prior,
                  "density_g_cm3": DENSITY,
                  "command": command,
                  "device": str(device),
                  "machine": f"{device_name(device)}, {args.threads} torch threads"}
    else:  # extend an earlier run (e.g. with the guided large cell)
        if not Path(args.out).is_file():
            parser.error(f"--atoms without values adds large cells to the curve in --out, but "
                         f"{args.out} does not exist: give atom counts, or an existing --out")
        result = json.loads(Path(args.out).read_text())
        result["command"] += f"; then {command}"
        points = result["points"]
    if args.large and args.atoms:
        result["large_cell"] = large_cell(args.large, n_small=args.small_samples,
                                          n_steps=args.large_steps, prior_name=args.prior,
                                          device=device)
        big = [p for p in points if p["atoms"] == args.large]
        if big and "guided_sample_s" in big[0]:
            result["large_cell"]["guided_s_estimate"] = big[0]["guided_sample_s"]
    if args.large and args.large_guided:
        result.setdefault("large_cell", {}).update(child_result(
            "--guided-cell", str(args.large), "--threads", str(args.threads), "--surrogate",
            args.surrogate, "--prior", args.prior, "--small-samples", str(args.small_samples),
            "--device", args.device, "--set", *args.set))
        result["large_cell"].pop("note", None)
    for n in args.validation:
        measured = child_result("--validate-cell", str(n), "--threads", str(args.threads),
                                "--device", args.device)
        result["validation"] = sorted(
            [p for p in result.get("validation", []) if p["atoms"] != n] + [measured],
            key=lambda p: p["atoms"])
        print(measured, flush=True)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
